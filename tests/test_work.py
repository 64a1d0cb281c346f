"""The resolved work plan: device and dtype resolved once, the device's defaults, and models loaded
through it."""

from __future__ import annotations

import pickle

import torch

from screener.work import CPU_CHUNK, GPU_CHUNK, Work


def test_resolve_and_describe():
    work = Work.resolve("cpu", "fp32")
    assert work == Work(torch.device("cpu"), torch.float32) and not work.gpu
    assert work.describe() == {"resolved_device": "cpu", "resolved_dtype": "float32"}
    assert Work.resolve("cpu", "bfloat16").dtype_name == "bfloat16"
    auto = Work.resolve()  # "auto" as a worker will run it: the driver's answer, carried as is
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pickle.loads(pickle.dumps(auto)) == auto


def test_device_defaults():
    cpu, gpu = Work(torch.device("cpu"), torch.float32), Work(torch.device("cuda"), torch.bfloat16)
    assert (cpu.chunk_size(), gpu.chunk_size(), cpu.chunk_size(7)) == (CPU_CHUNK, GPU_CHUNK, 7)
    tuned = cpu.score_settings(layers=(1,))
    assert (tuned.batch_tokens, tuned.generate_batch_size, tuned.max_batch_size) == (None, None, 64)
    fixed = cpu.score_settings(tuned=False, layers=(1,), batch_tokens=None)  # None: the default
    assert (fixed.batch_tokens, fixed.generate_batch_size) == (4096, 16)
    fixed = gpu.score_settings(tuned=False, layers=(1,), batch_tokens=1024)
    assert (fixed.batch_tokens, fixed.generate_batch_size, fixed.max_batch_size) == (1024, 64, 256)


def test_scorer_loads_the_model_on_the_plan(tiny_llama):
    from conftest import tiny_ref

    work = Work.resolve("cpu", "float32")
    scorer = work.scorer(tiny_ref(tiny_llama), None, work.score_settings(layers=(0, 2)))
    param = next(scorer.model.parameters())
    assert (param.device.type, param.dtype) == ("cpu", torch.float32) and not param.requires_grad
    assert scorer.means([[5, 6, 7]], [[8, 9]]).shape == (1, 3, 2, 64)
