"""The steering check: add coef·v to the residual stream at layer L while generating, and judge the
answers for the trait and for coherence at each coefficient (the paper's dose-response validation).

Layer L follows the convention of records.py: the hook adds to `hidden_states[L]`, i.e. the output of
decoder block L (L = 0: the embeddings, fed to block 1), at every position, prompt and answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from screener.errors import UserError
from screener.extract.judges import Judge, coherence_prompt
from screener.extract.traits import Trait
from screener.models import block_output, chat_ids, decoder_parts, generate, with_block_output


class SteerError(UserError, ValueError):
    """A steering request the model cannot take (e.g. a layer out of range)."""


class Steering:
    """Context manager: while active, `hidden_states[layer]` becomes `hidden_states[layer] + coef·vector`."""

    def __init__(self, model: torch.nn.Module, layer: int, vector: torch.Tensor, coef: float):
        _, blocks, _ = decoder_parts(model)
        if not 0 <= layer < len(blocks):
            n = len(blocks)
            raise SteerError(
                f"steering layer {layer} is out of range: it must be in 0..{n - 1} (hidden_states[0] = "
                f"embeddings, [L] = output of decoder block L); hidden_states[{n}] is excluded because it "
                "is the final norm's output, which only the LM head reads: no residual stream left to steer"
            )
        param = next(model.parameters())
        self.delta = (coef * vector.float()).to(param.device, param.dtype)
        # prepend: transformers records `output_hidden_states` with its own forward hooks, installed on
        # first use; ours must run before them for the recorded hidden_states[L] to include the shift
        if layer == 0:
            self.handle = blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        else:
            self.handle = blocks[layer - 1].register_forward_hook(self._post, prepend=True)

    def _pre(self, _module, args, kwargs):
        if args:
            return (args[0] + self.delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + self.delta}

    def _post(self, _module, _args, output):
        return with_block_output(output, block_output(output) + self.delta)

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@dataclass(frozen=True)
class SteerResult:
    coef: float
    trait_score: float | None  # mean over the answers the judge scored
    coherence: float | None
    answers: tuple[str, ...]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def steer_check(
    model,
    tokenizer,
    trait: Trait,
    vector: torch.Tensor,
    layer: int,
    coefs: Sequence[float],
    judge: Judge,
    questions: int = 5,
    max_new_tokens: int = 96,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[SteerResult]:
    """Answer the first `questions` evaluation questions (no system prompt of ours) at each coefficient."""
    qs = list(trait.eval_questions[:questions])
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in qs]
    results = []
    for coef in coefs:
        with Steering(model, layer, vector[layer], coef):
            answers = generate(model, tokenizer, prompts, max_new_tokens, temperature=temperature, seed=seed)
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers.answers]
        traits = judge.score([trait.judge_prompt(q, a) for q, a in zip(qs, texts, strict=True)])
        coh = judge.score([coherence_prompt(q, a) for q, a in zip(qs, texts, strict=True)])
        results.append(SteerResult(coef, _mean(traits), _mean(coh), tuple(texts)))
    return results
