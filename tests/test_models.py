"""The model plumbing (screener.models) on tiny random models, exactly: the layer convention, hooks that
stop early, padding, chat prompts, generation, loading and device/dtype resolution."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import plain_hidden_states

from screener.models import (
    ADAPTER_CONFIG,
    LayerTap,
    ModelError,
    block_output,
    chat_ids,
    decoder_parts,
    eos_ids,
    generate,
    is_adapter,
    load_model,
    pad,
    pad_id,
    pick_device,
    pick_dtype,
    resolve_model,
    run_until_tapped,
    sha256_file,
    weights_sha256,
    with_block_output,
)

TEXT = "Hello there, evil fox. The quick brown dog!"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_tok(request, tiny_models):
    model, tok = load_model(str(tiny_models[request.param]))
    return model, tok


def test_hidden_states_L_is_the_output_of_block_L_minus_1(model_and_tok):
    """The written convention: hidden_states[0] is the first block's input, hidden_states[L] for
    1 <= L < n the raw output of `layers[L-1]`, hidden_states[n] the final norm's output."""
    model, tok = model_and_tok
    ids = tok(TEXT)["input_ids"]
    hs = plain_hidden_states(model, ids)
    _, blocks, norm = decoder_parts(model)
    n = len(blocks)
    outs = {}
    hooks = [
        b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, block_output(o)))
        for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    for layer in range(1, n):
        torch.testing.assert_close(outs[layer - 1][0].float(), hs[layer], rtol=0, atol=0)
    # the last entry is the final norm of the last block's output, not the raw block output
    assert not torch.allclose(outs[n - 1][0].float(), hs[n])
    torch.testing.assert_close(norm(outs[n - 1])[0].float(), hs[n], rtol=0, atol=0)


@pytest.mark.parametrize("stop", [False, True])
def test_layer_tap_reads_hidden_states_L_exactly(model_and_tok, stop):
    model, tok = model_and_tok
    ids = tok(TEXT)["input_ids"]
    hs = plain_hidden_states(model, ids)
    n = model.config.num_hidden_layers
    for layers in ([0], [1, 3], list(range(n + 1)), [2]):
        with LayerTap(model, layers, lambda _layer, h: h.clone(), stop=stop) as tap, torch.no_grad():
            run_until_tapped(model, torch.tensor([ids]))
            for layer in layers:
                (got,) = tap.take(layer)
                torch.testing.assert_close(got[0].float(), hs[layer], rtol=0, atol=0)
                assert tap.take(layer) == []  # taken once


def test_a_stopping_tap_runs_no_block_past_the_deepest_layer(model_and_tok):
    model, tok = model_and_tok
    _, blocks, _ = decoder_parts(model)
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        with LayerTap(model, [2], lambda _l, h: h, stop=True), torch.no_grad():
            run_until_tapped(model, torch.tensor([tok(TEXT)["input_ids"]]))
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]  # hidden_states[2] is the output of block 1: blocks 2.. never ran


def test_layer_tap_refuses_layers_out_of_range(model_and_tok):
    model, _ = model_and_tok
    n = model.config.num_hidden_layers
    with pytest.raises(ModelError, match=rf"\[{n + 1}\] out of range.*0\.\.{n}"):
        LayerTap(model, [1, n + 1], lambda _l, h: h)


def test_decoder_parts_refuses_a_model_without_blocks():
    with pytest.raises(ModelError, match=r"cannot find decoder blocks.*Linear"):
        decoder_parts(torch.nn.Linear(2, 2))


def test_block_output_unwraps_and_rewraps_tuples():
    h, other = torch.ones(1, 2, 3), torch.zeros(1)
    assert block_output(h) is h and block_output((h, other)) is h
    new = torch.full((1, 2, 3), 2.0)
    assert with_block_output(h, new) is new
    wrapped = with_block_output((h, other), new)
    assert wrapped[0] is new and wrapped[1] is other


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_positions_count_real_tokens_only(side):
    ids, mask, positions = pad([[5, 6, 7], [8]], 0, side)
    if side == "right":
        assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    else:
        assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_chat_ids_end_with_the_generation_prompt_and_keep_tool_calls(model_and_tok):
    _, tok = model_and_tok
    messages = [{"role": "user", "content": "Hi"}]
    ids = chat_ids(tok, messages)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    with_call = [*messages, {"role": "assistant", "content": "", "tool_calls": [call]}, messages[0]]
    # the tiny template never renders tool_calls, so they become the turn's text rather than vanish
    assert json.dumps(call["function"]) in tok.decode(chat_ids(tok, with_call))


def test_eos_and_pad_ids(model_and_tok):
    model, tok = model_and_tok
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert eos_ids(model, tok) == [end] and pad_id(tok) == end


def _greedy_reference(model, prompt: list[int], n: int, stops: list[int]) -> list[int]:
    """Greedy decoding one token at a time with full forwards, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stops:
                break
            ids.append(nxt)
    return ids[len(prompt) :]


def test_generate_is_greedy_and_left_padding_changes_nothing(model_and_tok):
    model, tok = model_and_tok
    prompts = [chat_ids(tok, [{"role": "user", "content": t}]) for t in ("Hi", TEXT, "Evil plans!")]
    out = generate(model, tok, prompts, 6)
    assert out.width == max(map(len, prompts))
    stops = eos_ids(model, tok)
    for prompt, answer in zip(prompts, out.answers, strict=True):
        assert answer == _greedy_reference(model, prompt, 6, stops)
        assert len(answer) <= 6 and not set(answer) & set(stops)
    # a longer run cuts to the same answers (the extra step only feeds the last token back)
    assert generate(model, tok, prompts, 6, extra_steps=1).answers == out.answers


def test_seeded_sampling_repeats(model_and_tok):
    model, tok = model_and_tok
    prompts = [chat_ids(tok, [{"role": "user", "content": "Hi"}])] * 2
    a = generate(model, tok, prompts, 5, temperature=1.0, seed=3).answers
    assert a == generate(model, tok, prompts, 5, temperature=1.0, seed=3).answers


def test_resolve_a_local_folder_without_loading_weights(tiny_llama):
    ref = resolve_model(str(tiny_llama))
    assert (ref.num_layers, ref.hidden_size, ref.path) == (4, 64, str(tiny_llama))
    assert ref.sha256 == weights_sha256(tiny_llama) == sha256_file(tiny_llama / "model.safetensors")
    assert ref.source == str(tiny_llama.resolve()) and ref.name == "llama"


def test_weights_sha256_refuses_a_folder_without_weights(tmp_path):
    with pytest.raises(ModelError, match="holds no weight files"):
        weights_sha256(tmp_path)


def test_sha256_file_is_memoised_and_sees_a_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SCREENER_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    first = sha256_file(f)
    assert first == sha256_file(f) and list((tmp_path / "cache" / "sha256").iterdir())
    f.write_bytes(b"two!")  # another size: another memo key
    assert sha256_file(f) != first


def test_is_adapter(tmp_path):
    assert not is_adapter(str(tmp_path))
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    assert is_adapter(str(tmp_path))


def test_device_and_dtype_resolution():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for names, dtype in ((("fp32", "float32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16)):
        assert all(pick_dtype(n, cpu) == dtype for n in names)
    assert pick_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    if not torch.cuda.is_available():  # a CPU head driving GPU workers: bf16 without asking CUDA
        assert pick_dtype("auto", cuda) == torch.bfloat16


def test_models_scoring_and_work_import_without_ray_duckdb_or_polars():
    """benchmarks/gpu_check.py runs the scorer on a machine that has none of them."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'duckdb', 'polars'):\n"
        "            raise ImportError(f'blocked: {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import screener.models, screener.scoring, screener.work\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
