"""The vectors README's specificity tables, from the sidecars (nothing is recomputed):

    python benchmarks/vectors_table.py [screener/data/vectors/SmolLM2-135M-Instruct]

Per vector at its chosen layer: share of its own held-out pairs ranked right / paired d (bold), the same on
every other trait's held-out pairs, then on every style control (share of pairs with side a above b).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent.parent / "screener" / "data" / "vectors" / "SmolLM2-135M-Instruct"


def cell(share: float, d: float, bold: bool = False) -> str:
    text = f"{share:.2f} / {d:.2f}"
    return f"**{text}**" if bold else text


def tables(folder: Path) -> str:
    sides = {}
    for path in sorted(folder.glob("*_response_avg_diff.json")):
        side = json.loads(path.read_text())
        sides[side["trait"]] = side
    traits = sorted(sides)
    controls = sorted({c for s in sides.values() for c in (s.get("specificity") or {}).get("controls", {})})
    head = "| vector | layer | pairs | " + " | ".join(traits) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(traits)]
    for t in traits:
        s, layer = sides[t], sides[t]["chosen_layer"]
        own = next(r for r in s["layer_report"] if r["layer"] == layer)
        others = s["specificity"]["traits"]
        cells = [
            cell(own["share_ranked"], own["paired_d"], True)
            if o == t
            else cell(others[o]["share_ranked"][layer], others[o]["paired_d"][layer])
            if o in others
            else "-"
            for o in traits
        ]
        pairs = s.get("eval_examples", {}).get("pairs", "?")
        how = "" if s.get("chosen_layer_how") == "specific" else f" ({s.get('chosen_layer_how')})"
        lines.append(f"| {t} | {layer}{how} | {pairs} | " + " | ".join(cells) + " |")
    if controls:
        lines += [
            "",
            "| vector | layer | " + " | ".join(controls) + " |",
            "|---|---|" + "---|" * len(controls),
        ]
        for t in traits:
            s, layer = sides[t], sides[t]["chosen_layer"]
            got = s["specificity"].get("controls", {})
            cells = [
                cell(got[c]["share_ranked"][layer], got[c]["paired_d"][layer]) if c in got else "-"
                for c in controls
            ]
            lines.append(f"| {t} | {layer} | " + " | ".join(cells) + " |")
        sets = next(iter(sides.values()))["specificity"].get("control_sets", {})
        lines += ["", "Controls (side a > side b): " + "; ".join(
            f"{c}: {sets[c]['a']} > {sets[c]['b']} ({sets[c]['pairs']} pairs)" for c in controls if c in sets
        )]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
