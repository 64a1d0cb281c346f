"""Does a trait file's written pairs differ in the trait only? Surface checks of style confounds.

The vector of `--from-examples` is mean(positive) - mean(negative), so any style the two sides differ in
(length, hedging, lists, markdown) is read as the trait. Per trait this prints: pairs per register
(the optional `"register"` key of a pair), the pos/neg length ratio (chars) and the pairs outside
0.75..1.33, the share of answers that hedge, hold a list, use markdown, exclaim or speak of enjoyment on
each side, how often each side addresses the user ("you"), and how far the held-out questions overlap the
extraction ones (exact repeats, and the closest word overlap).
No model is needed.

    python benchmarks/example_balance.py                 # every built-in trait
    python benchmarks/example_balance.py evil --pairs    # and one line per pair outside the ratio band
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter

from screener.extract.traits import list_traits, trait_path

LOW, HIGH = 0.75, 1.33
HEDGES = re.compile(
    r"\b(might|may|perhaps|maybe|possibly|probably|i think|i guess|i suppose|i'd say|it seems|could be|"
    r"not sure|arguably|likely|somewhat|kind of|sort of)\b",
    re.IGNORECASE,
)
LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
MARKDOWN = re.compile(r"(\*\*[^*]+\*\*|^#+\s|`)", re.MULTILINE)
WORD = re.compile(r"[a-z']+")
ENJOY = re.compile(r"\b(fun|enjoy\w*|love|lovely|delight\w*|satisf\w*|wonderful|best part)\b", re.IGNORECASE)
YOU = re.compile(r"\byou(?:r|rs|'re|'ve|'ll|'d)?\b", re.IGNORECASE)


def has_list(text: str) -> bool:
    return len(LIST_LINE.findall(text)) >= 2


def words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if len(w) > 3}


def sides(pairs: list[dict], test) -> tuple[float, float]:
    """The share of positive and of negative answers for which `test` holds."""
    n = max(1, len(pairs))
    return tuple(sum(bool(test(p[side])) for p in pairs) / n for side in ("positive", "negative"))


def per_100_words(pairs: list[dict], pattern: re.Pattern) -> tuple[float, float]:
    def rate(side: str) -> float:
        hits = sum(len(pattern.findall(p[side])) for p in pairs)
        return 100 * hits / max(1, sum(len(p[side].split()) for p in pairs))

    return rate("positive"), rate("negative")


def pair_report(pairs: list[dict]) -> dict:
    ratios = [len(p["positive"]) / len(p["negative"]) for p in pairs]
    return {
        "n": len(pairs),
        "registers": Counter(p.get("register", "-") for p in pairs),
        "ratio_mean": statistics.mean(ratios),
        "ratio_out": [(i, r) for i, r in enumerate(ratios) if not LOW <= r <= HIGH],
        "hedge": sides(pairs, HEDGES.search),
        "hedges_per_100w": per_100_words(pairs, HEDGES),
        "exclaim": sides(pairs, lambda t: "!" in t.replace("!=", "")),
        "you_per_100w": per_100_words(pairs, YOU),
        "enjoy": sides(pairs, ENJOY.search),
        "list": sides(pairs, has_list),
        "markdown": sides(pairs, MARKDOWN.search),
        "words": tuple(statistics.mean(len(p[s].split()) for p in pairs) for s in ("positive", "negative")),
    }


def overlap(train: list[dict], held: list[dict]) -> tuple[int, float, str]:
    """Exact repeats, and the held-out question closest (Jaccard of content words) to any extraction one."""
    exact = len({p["question"] for p in train} & {p["question"] for p in held})
    best, which = 0.0, ""
    train_words = [words(p["question"]) for p in train]
    for p in held:
        w = words(p["question"])
        for t in train_words:
            j = len(w & t) / max(1, len(w | t))
            if j > best:
                best, which = j, p["question"]
    return exact, best, which


def show(name: str, per_pair: bool) -> None:
    data = json.loads(trait_path(name).read_text())
    print(f"== {name} (version {data.get('version')})")
    for key in ("examples", "eval_examples"):
        pairs = data.get(key, [])
        if not pairs:
            print(f"  {key}: none")
            continue
        r = pair_report(pairs)
        regs = ", ".join(f"{k} {v}" for k, v in sorted(r["registers"].items()))
        print(f"  {key}: {r['n']} pairs; registers: {regs}")
        print(
            f"    length ratio pos/neg: mean {r['ratio_mean']:.3f}, "
            f"outside {LOW}..{HIGH}: {len(r['ratio_out'])}"
            f"; mean words pos {r['words'][0]:.0f} / neg {r['words'][1]:.0f}"
        )
        print(
            f"    hedging: pos {r['hedge'][0]:.2f} / neg {r['hedge'][1]:.2f} of answers"
            f" ({r['hedges_per_100w'][0]:.2f} / {r['hedges_per_100w'][1]:.2f} per 100 words)"
        )
        print(
            f"    lists: pos {r['list'][0]:.2f} / neg {r['list'][1]:.2f}; "
            f"markdown: pos {r['markdown'][0]:.2f} / neg {r['markdown'][1]:.2f}"
        )
        print(
            f"    exclamations: pos {r['exclaim'][0]:.2f} / neg {r['exclaim'][1]:.2f}; "
            f"enjoyment words (fun, love, delight...): pos {r['enjoy'][0]:.2f} / neg {r['enjoy'][1]:.2f}"
        )
        print(f"    'you' per 100 words: pos {r['you_per_100w'][0]:.1f} / neg {r['you_per_100w'][1]:.1f}")
        if per_pair:
            for i, ratio in r["ratio_out"]:
                print(f"    {key}[{i}] ratio {ratio:.2f}: {pairs[i]['question'][:70]}")
    exact, best, which = overlap(data.get("examples", []), data.get("eval_examples", []))
    print(
        f"  held-out vs extraction questions: {exact} exact repeats; closest word overlap {best:.2f}"
        + (f" ({which[:60]!r})" if which else "")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traits", nargs="*", help="trait names or files (default: every built-in)")
    ap.add_argument("--pairs", action="store_true", help="list each pair outside the length-ratio band")
    args = ap.parse_args()
    for name in args.traits or [n for n, _ in list_traits()]:
        show(name, args.pairs)


if __name__ == "__main__":
    main()
