"""Tests for screener.vectors: loading and checking vector files and sidecars (every problem one error
naming the file), and unit vectors whose scale never changes a score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from screener.errors import UserError
from screener.vectors import Vector, VectorError, load_vector, save_vector, unit_vectors

ROWS, HIDDEN = 5, 8


def vector(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_scale_never_changes_a_unit_vector() -> None:
    """1e30s overflowed the float32 norm (every score 0.0); 1e-30s were close to being called zero."""
    v = vector()
    base = unit_vectors([v], [1, 4])
    for scale in (1e30, 1e-30, 3.0e38 / v.abs().max().item()):
        scaled = unit_vectors([v * scale], [1, 4])
        for layer in (1, 4):
            assert torch.isfinite(scaled[layer]).all()
            torch.testing.assert_close(scaled[layer], base[layer], rtol=1e-6, atol=1e-7)
    assert base[1].shape == (HIDDEN, 1) and torch.linalg.vector_norm(
        base[1].double()
    ).item() == pytest.approx(1)


def test_a_zero_vector_is_refused_naming_its_file() -> None:
    v = vector()
    v[2] = 0
    with pytest.raises(
        VectorError, match=r"^b\.pt: a persona vector is zero at layer 2; it has no direction$"
    ):
        unit_vectors([vector(1), v], [1, 2], ["a.pt", "b.pt"])
    unit_vectors([v], [1, 3])  # other layers are fine


def test_a_vector_file_and_its_sidecar_load(tmp_path: Path) -> None:
    path = save_vector(tmp_path / "evil_response_avg_diff.pt", vector(), {"trait": "evil", "chosen_layer": 3})
    v = load_vector(path)
    assert (v.name, v.default_layer) == ("evil", 3) and torch.equal(v.tensor, vector())
    assert load_vector(path, "mine").name == "mine"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"hello world, this is a text file\n",
            "not a torch.save file (it begins with the text 'hello world,",
        ),
        (b"", "not a torch.save file (the file is empty)"),
        (b"\x00\x01\x02\x03garbage", "not a torch.save file (it begins with the bytes 00 01 02 03"),
        (b"PK\x03\x04 a broken zip", "cannot be loaded as a tensor ("),
    ],
)
def test_a_file_that_is_not_a_saved_tensor_is_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    """A text file as .pt said "not a torch.save'd tensor (101)"."""
    (path := tmp_path / "v.pt").write_bytes(content)
    with pytest.raises(VectorError) as e:
        load_vector(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)
    assert isinstance(e.value, UserError) and e.value.exit_code == 2


def test_tensors_of_the_wrong_kind(tmp_path: Path) -> None:
    for tensor, message in (
        (torch.zeros(3), r"expected a \[num_layers\+1, hidden\] tensor, got \(3,\)"),
        (torch.ones(ROWS, HIDDEN, dtype=torch.int64), "expected a float tensor, got int64"),
        (torch.full((ROWS, HIDDEN), float("nan")), "holds NaN or inf values"),
        (torch.full((ROWS, HIDDEN), 1e300, dtype=torch.float64), "beyond float32's range"),
    ):
        torch.save(tensor, path := tmp_path / "v.pt")
        with pytest.raises(VectorError, match=message):
            load_vector(path)


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ("{not json", "the vector's sidecar is not valid JSON"),
        ("[1, 2]", "the vector's sidecar is not a JSON object"),
    ],
)
def test_a_corrupt_sidecar_names_the_sidecar(tmp_path: Path, sidecar: str, message: str) -> None:
    torch.save(vector(), path := tmp_path / "v.pt")
    (tmp_path / "v.json").write_text(sidecar)
    with pytest.raises(VectorError) as e:
        load_vector(path)
    assert str(e.value).startswith(f"{tmp_path / 'v.json'}: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("layer", ["abc", True, -1, 2.5, [3]])
def test_a_chosen_layer_that_is_not_a_layer_number_names_the_sidecar(layer: object) -> None:
    v = Vector("t", "/x/v.pt", "00", vector(), {"chosen_layer": layer})
    with pytest.raises(
        VectorError, match=r"^/x/v\.json: chosen_layer .* is not a layer number; fix the sidecar"
    ):
        _ = v.default_layer
    v.check_layer(4, num_layers=4)
    with pytest.raises(VectorError, match=r"^/x/v\.json: chosen_layer 5 is out of range: m has .* 0\.\.4"):
        v.check_layer(5, num_layers=4, model_name="m")
    assert Vector("t", "/x/v.pt", "00", vector(), {"chosen_layer": 3.0}).default_layer == 3


def test_the_sidecar_trait_name_is_used_as_text(tmp_path: Path) -> None:
    torch.save(vector(), path := tmp_path / "x_response_avg_diff.pt")
    (tmp_path / "x_response_avg_diff.json").write_text(json.dumps({"trait": 7}))
    assert load_vector(path).name == "7"
