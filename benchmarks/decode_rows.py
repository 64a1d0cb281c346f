"""Decode tokens per second by generation rows: natural mode's decode loop (`screener.models.decode`) from
one prefill, on prompts of the ShareGPT slice, greedy, every row running the full `--new-tokens` (no
end-of-turn stop, so each size does the same work a row), in wall and CPU seconds.

    python benchmarks/decode_rows.py --rows 1,4,8,16,32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from bench import write_slice
from machine import header

from screener.models import chat_ids, decode, pad_id, pick_device, pick_dtype, prefill, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,8,16,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    print(header(device))
    name = str(dtype).removeprefix("torch.")
    print(f"dtype {name}; {args.new_tokens} new tokens a row; load {os.getloadavg()}")
    model, tok = resolve_model("default").load(device, dtype)
    sizes = [int(x) for x in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_slice(tok, max(sizes), Path(tmp) / "slice.jsonl")
    prompts = [chat_ids(tok, s.prompt) for s in samples]
    print("| rows | prompt tokens (max) | decode wall s | decode CPU s | tokens/s wall | tokens/CPU-s |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in sizes:
            batch = prompts[:rows]
            state = prefill(model, batch, [len(p) for p in batch], pad_id(tok), args.new_tokens)
            started, cpu = time.perf_counter(), time.process_time()
            decode(model, state, [], args.new_tokens, lambda logits: logits.argmax(dim=-1))
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            n = rows * args.new_tokens
            widest = max(map(len, batch))
            print(f"| {rows} | {widest} | {wall:.1f} | {cpu:.1f} | {n / wall:.1f} | {n / cpu:.1f} |")


if __name__ == "__main__":
    main()
