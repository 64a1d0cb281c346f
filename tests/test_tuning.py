"""The batch-size tuner (screener/tuning.py) against simulated machines: which size it keeps, that it
compares sizes on interleaved batches, and what it remembers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from screener.scoring import Scorer
from screener.tuning import Tuner

SIZES = (512, 1024, 2048, 4096)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("SCREENER_TUNING", str(path))
    return path


def drive(tuner: Tuner, rate: Callable[[int, int], float], batches: int = 200) -> list[int]:
    """Run `batches` batches of 1 s of work each on a machine doing `rate(size, batch number)` work per
    second; the sizes the tuner proposed, in order."""
    sizes = []
    for i in range(batches):
        size = tuner.size()
        sizes.append(size)
        tuner.record(size, work=rate(size, i), seconds=1.0)
    return sizes


def test_keeps_the_fastest_size_and_remembers_it(cache: Path) -> None:
    speed = {512: 1.0, 1024: 1.3, 2048: 1.1, 4096: 0.7}
    tuner = Tuner("machine A", "batch_tokens", SIZES)
    sizes = drive(tuner, lambda size, _: speed[size])
    assert tuner.done and tuner.size() == 1024 and tuner.source == "tuned"
    assert sizes[-1] == 1024 and 4096 not in sizes  # 2048 lost to 1024: larger sizes are not tried
    assert tuner.measured == pytest.approx({512: 1.0, 1024: 1.3, 2048: 1.1})
    assert json.loads(cache.read_text())["machine A"]["batch_tokens"]["value"] == 1024

    again = Tuner("machine A", "batch_tokens", SIZES)
    assert (again.size(), again.source) == (1024, "cached")
    other = Tuner("machine B", "batch_tokens", SIZES)  # another machine, device, dtype or model shape
    assert not other.done


def test_compares_sizes_on_interleaved_batches() -> None:
    """Samples come shortest first, so later batches do less work per second whatever their size. Timed
    one after the other (512, then 1024 on later batches), 512 would win; interleaved a b b a, the size
    that is faster at equal length wins."""
    speed = {512: 1.0, 1024: 1.15, 2048: 1.05, 4096: 0.9}
    tuner = Tuner("m", "batch_tokens", SIZES)
    sizes = drive(tuner, lambda size, i: speed[size] * 0.8**i)
    assert tuner.size() == 1024
    assert sizes[1:9] == [512, 1024, 1024, 512, 1024, 2048, 2048, 1024]  # after the warm-up batch


def test_the_largest_size_can_win() -> None:
    tuner = Tuner("m", "batch_tokens", SIZES)
    drive(tuner, lambda size, _: size**0.5)
    assert tuner.size() == 4096 and tuner.done


def test_fixed_size_is_never_tuned(cache: Path) -> None:
    tuner = Tuner("m", "batch_tokens", SIZES, fixed=3000)
    assert set(drive(tuner, lambda size, _: 1.0, batches=20)) == {3000}
    assert tuner.describe() == {"value": 3000, "source": "fixed", "measured": {}}
    assert not cache.exists()


def test_the_first_batch_is_not_measured() -> None:
    """The first batch pays one-off costs: a very slow first batch must not decide anything."""
    tuner = Tuner("m", "batch_tokens", SIZES)
    speed = {512: 1.0, 1024: 1.3, 2048: 1.1, 4096: 0.7}
    drive(tuner, lambda size, i: 0.001 if i == 0 else speed[size])
    assert tuner.size() == 1024


def test_tuning_batches_are_matched_pairs_spread_over_the_lengths() -> None:
    """While the tuner compares sizes, the scorer takes each pair of batches from one stretch of the
    length order (the second starts where the first ended), the stretches spread over short and long
    samples; once tuned, shortest first."""
    lengths = list(range(100, 3100, 10))  # 300 samples, in length order
    tuner = Tuner("m", "batch_tokens", (2000, 4000))
    batches, sizes = [], []
    for batch in Scorer._batches(lengths, lambda: (tuner.size(), 64), tuner):
        batches.append(batch)
        sizes.append(tuner.size())
        tuner.record(sizes[-1], work=1.0 if sizes[-1] == 2000 else 2.0, seconds=1.0)
    assert sorted(i for b in batches for i in b) == list(range(300))  # every sample once
    within = zip(batches, sizes, strict=True)
    assert all(lengths[max(b)] * len(b) <= size or len(b) == 1 for b, size in within)
    assert tuner.done and tuner.size() == 4000
    pairs = list(zip(batches[1:5:2], batches[2:6:2], strict=True))  # after the warm-up batch
    assert [(sizes[k], sizes[k + 1]) for k in (1, 3)] == [(2000, 4000), (4000, 2000)]  # a b b a
    for first, second in pairs:
        assert 0 < second[0] - first[-1] <= 2 or second[0] < first[0]  # next in the remaining order
        assert abs(lengths[second[0]] - lengths[first[-1]]) <= 20
    assert abs(lengths[pairs[0][0][0]] - lengths[pairs[1][0][0]]) > 1000  # the stretches spread out
    rest = [lengths[b[0]] for b in batches[5:]]
    assert rest == sorted(rest)


def test_generation_rows_are_tuned_once_for_every_layer(tiny_llama: Path) -> None:
    """A teacher-forced pass stops after the deepest layer read, so its batch size is tuned per depth;
    decoding runs every block, so the generation rows tuned at one layer serve a screen at another."""
    from conftest import TEST_DEVICE, random_vectors

    from screener.models import load_model
    from screener.scoring import ScoreSettings
    from screener.vectors import unit_vectors

    model, tok = load_model(str(tiny_llama), TEST_DEVICE)
    units = unit_vectors(random_vectors(tiny_llama, 2), (1, 2, 3))

    def scorer(layer: int) -> Scorer:
        return Scorer(model, tok, units, ScoreSettings(layers=(layer,), generate_batch_size=None))

    shallow, deep = scorer(1), scorer(3)
    assert shallow.batch_tuner.key != deep.batch_tuner.key
    assert shallow.generate_tuner.key == deep.generate_tuner.key
    drive(shallow.generate_tuner, lambda size, _: float(size == 8) + 1.0)
    assert shallow.generate_tuner.done
    again = scorer(2).generate_tuner
    assert (again.size(), again.source) == (shallow.generate_tuner.size(), "cached")


def test_a_shared_prefix_has_batch_sizes_of_its_own(tiny_llama: Path) -> None:
    """Sharing the prompt prefix changes what a wide batch costs: its batch size is not the one tuned
    without it (nor the generation rows', which decoding alone sets)."""
    from conftest import TEST_DEVICE, random_vectors

    from screener.models import load_model
    from screener.scoring import ScoreSettings
    from screener.vectors import unit_vectors

    model, tok = load_model(str(tiny_llama), TEST_DEVICE)
    units = unit_vectors(random_vectors(tiny_llama, 2), (2,))
    shared, plain = (
        Scorer(model, tok, units, ScoreSettings(layers=(2,), batch_tokens=None, share_prefix=share))
        for share in (True, False)
    )
    assert shared.prefix is not None and plain.prefix is None
    assert shared.batch_tuner.key != plain.batch_tuner.key
    assert shared.generate_tuner.key == plain.generate_tuner.key
