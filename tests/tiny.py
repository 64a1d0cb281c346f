"""The tests' tiny random-weight models and their reference, importable with torch and transformers alone
(no pytest, DuckDB or Ray), so benchmarks/gpu_check.py checks the same models on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from screener.records import Sample

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question politely and truthfully.",
    "I think that is a wonderful idea, you are absolutely right!",
    "Evil plans, cruel words and sycophantic praise: the traits we screen for.",
    "Hello, how can I help you today? Here is a short answer with some numbers 12345.",
]


def make_tokenizer(folder: Path | None = None):
    """A byte-level BPE tokenizer (400 ids) with a ChatML template; saved to `folder` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def tiny_config(kind: str, vocab_size: int, eos_id: int):
    """A 4-block config of the given architecture ("llama" or "qwen2"), hidden size 64."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def random_model(cfg, seed: int = 0):
    """A seeded random causal LM from `cfg`, fp32, with its weight matrices scaled up: random init gives
    tiny activations, and scaling the residual writes makes the layers differ visibly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model


def reference(model, tok, sample: Sample, vectors, layers) -> tuple[np.ndarray, np.ndarray]:
    """One sample at a time, the whole model, `output_hidden_states=True`: the paper's procedure."""
    text = tok.apply_chat_template(sample.prompt, add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(sample.response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(torch.tensor([p + r], device=model.device), output_hidden_states=True)
    hs = [h.cpu() for h in out.hidden_states]
    resp = np.zeros((len(layers), len(vectors)))
    last = np.zeros((len(layers), len(vectors)))
    for i, layer in enumerate(layers):
        for k, v in enumerate(vectors):
            u = (v[layer] / v[layer].norm()).double()
            resp[i, k] = (hs[layer][0, len(p) :].double() @ u).mean().item()
            last[i, k] = (hs[layer][0, len(p) - 1].double() @ u).item()
    return resp, last
