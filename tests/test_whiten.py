"""Whitened vectors (`screener extract --whiten`): the algebra on planted directions, the controls split
into a fitting and a reporting half, and the in-process memo that lets several traits share their reads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_ref
from test_controls import IN_PROCESS, SETTINGS, TRAIT, control

from screener.extract.controls import load_controls
from screener.extract.pipeline import ExtractSettings, Whitening, extract_from_examples
from screener.extract.traits import load_trait
from screener.extract.vectors import ActivationStage, whiten
from screener.vectors import load_vector


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def planted(n: int = 200, h: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs whose positive is the trait (e0) plus a confound (e1) on top of shared noise, and nuisance
    pairs that differ only by the confound; `[n, 2 layers, h]`."""
    g = torch.Generator().manual_seed(seed)
    e0, e1 = torch.eye(h)[0], torch.eye(h)[1]
    base = torch.randn(n, 2, h, generator=g)
    pos = base + e0 + e1 + 0.1 * torch.randn(n, 2, h, generator=g)
    neg = base + 0.1 * torch.randn(n, 2, h, generator=g)
    nuisance = e1 * (1 + 0.3 * torch.randn(n, 2, 1, generator=g)) + 0.1 * torch.randn(n, 2, h, generator=g)
    return pos, neg, nuisance


def test_whitening_takes_the_confound_out_and_keeps_the_trait():
    pos, neg, nuisance = planted()
    e0 = torch.eye(8)[0]
    mean_diff = pos.mean(0) - neg.mean(0)
    w = whiten(pos, neg, True, [nuisance], Whitening(0.03, 1.0))
    for layer in range(2):
        assert cos(mean_diff[layer], e0) == pytest.approx(2**-0.5, abs=0.05)  # the plain vector reads both
        assert cos(w[layer], e0) > 0.97
        # scaled to the mean difference's component along it: the file keeps activation units
        unit = w[layer] / w[layer].norm()
        assert float(w[layer].norm()) == pytest.approx(float(mean_diff[layer] @ unit), rel=1e-5)
    # with no nuisance and no spread to whiten against, it is the mean difference itself
    same = torch.zeros(5, 2, 8)
    shift = torch.randn(2, 8)
    assert torch.allclose(whiten(same + shift, same, True, [], Whitening(0.03, 1.0)), shift, atol=1e-5)


def test_unpaired_whitening_uses_the_within_class_spread():
    pos, neg, nuisance = planted()
    neg = neg[torch.randperm(len(neg), generator=torch.Generator().manual_seed(1))]
    e0 = torch.eye(8)[0]
    plain = cos(pos.mean(0)[0] - neg.mean(0)[0], e0)
    # the classes' own spread (noise of variance 1 in every direction) dilutes the nuisance's weight
    assert cos(whiten(pos, neg, False, [nuisance], Whitening(0.03, 1.0))[0], e0) > plain + 0.05
    assert cos(whiten(pos, neg, False, [nuisance], Whitening(0.03, 20.0))[0], e0) > 0.97


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    traits, controls = tmp_path_factory.mktemp("traits"), tmp_path_factory.mktemp("controls")
    (traits / "planted.json").write_text(json.dumps(TRAIT))
    other = {**TRAIT, "name": "other"}
    other["examples"] = [
        {"question": f"Other {i}?", "positive": "Fine, thanks a lot.", "negative": "No."} for i in range(3)
    ]
    (traits / "other.json").write_text(json.dumps(other))
    c = control("style", "Well, perhaps, maybe so.", "Yes.", n=5)
    (controls / "style.json").write_text(json.dumps(c))
    return traits, controls


def run(tiny_llama, dirs, out, whitening, memo=None, settings: ExtractSettings = SETTINGS):
    traits, controls = dirs
    trait = load_trait("planted", traits)
    return extract_from_examples(
        trait,
        tiny_ref(tiny_llama),
        settings,
        IN_PROCESS,
        out,
        traits_dir=traits,
        controls=load_controls(controls),
        whitening=whitening,
        memo=memo,
    )


def test_a_whitened_extraction_reports_controls_on_the_pairs_it_did_not_fit(tiny_llama, dirs, tmp_path):
    traits, _ = dirs
    other = load_trait("other", traits)
    how = Whitening(0.03, 1.0)
    white = run(tiny_llama, dirs, tmp_path / "white", (how, {"other": other}))
    plain = run(tiny_llama, dirs, tmp_path / "plain", None)
    side = white.sidecars["response_avg"]
    assert side["whitened"]["traits"] == {"other": other.sha256}
    assert side["whitened"]["controls"] == {"style": {"pairs": 3, "half": "even pairs (0, 2, ...)"}}
    assert (side["whitened"]["shrinkage"], side["whitened"]["weight"]) == (0.03, 1.0)
    # reported on the odd pairs only (2 of 5); without whitening on all 5
    assert side["specificity"]["control_sets"]["style"]["pairs"] == 2
    assert plain.sidecars["response_avg"]["specificity"]["control_sets"]["style"]["pairs"] == 5
    w = load_vector(white.paths["response_avg"]).tensor
    p = load_vector(plain.paths["response_avg"]).tensor
    assert not torch.allclose(w[1:], p[1:])  # whitening changed the direction
    # and the whitened direction is the algebra's, on the activations the pipeline read
    stage = ActivationStage(tiny_ref(tiny_llama), SETTINGS)
    stage.setup()
    from screener.extract.examples import from_trait, from_written
    from screener.extract.vectors import example_reads
    from screener.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    trait = load_trait("planted", traits)
    pos, neg, _, _ = example_reads(tok, from_trait(trait, "examples"), SETTINGS.max_tokens)
    opos, oneg, _, _ = example_reads(tok, from_trait(other, "examples"), SETTINGS.max_tokens)
    style = load_controls(dirs[1])["style"]
    a, b, _, _ = example_reads(tok, from_written(style.pairs, "style", {}), SETTINGS.max_tokens)

    def acts(reads):
        return stage.read([r[0] for r in reads], [r[1] for r in reads])[:, 0].float()

    nuisance = [acts(opos) - acts(oneg), acts(a[0::2]) - acts(b[0::2])]
    expected = whiten(acts(pos), acts(neg), True, nuisance, how)
    assert torch.allclose(w, expected, rtol=1e-4, atol=1e-6)


def test_the_memo_reads_each_text_once_and_changes_nothing(tiny_llama, dirs, tmp_path, monkeypatch):
    calls = []
    original = ActivationStage.read

    def counting(self, prompts, responses):
        if self.memo is not None:
            calls.append(
                sum((tuple(p), tuple(r)) not in self.memo for p, r in zip(prompts, responses, strict=True))
            )
        return original(self, prompts, responses)

    monkeypatch.setattr(ActivationStage, "read", counting)
    memo: dict = {}
    first = run(tiny_llama, dirs, tmp_path / "a", None, memo)
    read_first = sum(calls)
    assert read_first > 0 and len(memo) > 0
    calls.clear()
    second = run(tiny_llama, dirs, tmp_path / "b", None, memo)
    assert sum(calls) == 0  # every text was read already
    plain = run(tiny_llama, dirs, tmp_path / "c", None)
    for result in (first, second):
        assert torch.equal(
            load_vector(result.paths["response_avg"]).tensor, load_vector(plain.paths["response_avg"]).tensor
        )
        assert (
            result.sidecars["response_avg"]["layer_report"] == plain.sidecars["response_avg"]["layer_report"]
        )


def test_the_command_extracts_several_traits_whitened(tiny_llama, dirs, tmp_path, capsys):
    from screener import cli

    traits, controls = dirs
    argv = ["extract", "planted", "other", "--from-examples", "--whiten", "planted,other", "--traits-dir",
            str(traits), "--controls", str(controls), "--model", str(tiny_llama), "--actors", "0",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done in") == 2
    for name, other in (("planted", "other"), ("other", "planted")):
        vec = load_vector(tmp_path / "out" / f"{name}_response_avg_diff.pt")
        assert set(vec.sidecar["whitened"]["traits"]) == {other}
    # 'others' is every other visible trait, the built-in ones too
    parsed = cli.build_parser(["extract"]).parse_args(["extract", "evil", "--whiten", "others"])
    assert parsed.whiten == "others" and parsed.trait == ["evil"]
    # one FILE cannot be both traits' examples
    argv[argv.index("--from-examples") + 1 : argv.index("--from-examples") + 1] = [str(tmp_path / "x.jsonl")]
    assert cli.main(argv) == 2
    assert "give one trait" in capsys.readouterr().err


def test_whitened_and_orthogonal_read_once_and_compose(tiny_llama, dirs, tmp_path):
    """--whiten and --orthogonal-to together: the vector is the whitened one less the other trait's mean
    difference, from one pass (each text read once)."""
    from screener.extract.examples import from_trait
    from screener.extract.vectors import example_reads, orthogonalize
    from screener.models import load_tokenizer

    traits, controls = dirs
    other = load_trait("other", traits)
    how = Whitening(0.03, 1.0)
    trait = load_trait("planted", traits)
    both = extract_from_examples(
        trait, tiny_ref(tiny_llama), SETTINGS, IN_PROCESS, tmp_path / "both", traits_dir=traits,
        controls=load_controls(controls), whitening=(how, {"other": other}), orthogonal_to={"other": other},
    )  # fmt: skip
    white = run(tiny_llama, dirs, tmp_path / "white", (how, {"other": other}))
    side = both.sidecars["response_avg"]
    assert "whitened" in side and "orthogonal_to" in side
    stage = ActivationStage(tiny_ref(tiny_llama), SETTINGS)
    stage.setup()
    tok = load_tokenizer(str(tiny_llama))
    opos, oneg, _, _ = example_reads(tok, from_trait(other, "examples"), SETTINGS.max_tokens)

    def mean(reads):
        return stage.read([r[0] for r in reads], [r[1] for r in reads])[:, 0].double().mean(0)

    expected = orthogonalize(load_vector(white.paths["response_avg"]).tensor, [mean(opos) - mean(oneg)])
    assert torch.allclose(load_vector(both.paths["response_avg"]).tensor, expected, rtol=1e-4, atol=1e-6)
