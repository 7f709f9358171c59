"""Prefill and decode throughput, time to first token and peak memory: gptoss-jax vs transformers
on the same random checkpoint, in one run.

    python benchmarks/bench_generate.py [--prompt 512] [--new 64] [--dtype float32]

Measured on whatever JAX/torch device is present (CPU here: label the numbers as CPU figures).
Compile time is excluded (one warm-up run per shape); transformers runs eager attention.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np


def small_config():
    from gptoss_jax.config import FULL, SLIDING, preset

    return preset("gpt-oss-20b").replace(
        hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, head_dim=32, num_local_experts=16, num_experts_per_tok=4, sliding_window=128,
        layer_types=(SLIDING, FULL, SLIDING, FULL), vocab_size=32000, pad_token_id=None, eos_token_id=None)


def timed(fn, repeat=3):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    import jax
    import torch

    from gptoss_jax import load_model, write_random_checkpoint
    from gptoss_jax.generate import generate

    cfg = small_config()
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "ckpt")
    write_random_checkpoint(cfg, path, progress=False)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt)).astype(np.int32)

    model = load_model(path, dtype=args.dtype, kernels="xla", progress=False)
    ttft = timed(lambda: generate(model, ids, max_new_tokens=1, temperature=0, stop_tokens=()))
    full = timed(lambda: generate(model, ids, max_new_tokens=args.new, temperature=0, stop_tokens=()))
    ours = {"ttft_s": ttft, "prefill_tok_s": args.prompt / ttft, "decode_tok_s": (args.new - 1) / (full - ttft)}
    jax_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    from transformers import GptOssForCausalLM, Mxfp4Config

    tdt = torch.float32 if args.dtype == "float32" else torch.bfloat16
    ref = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=tdt,
                                            attn_implementation="eager").eval()
    tid = torch.from_numpy(ids.astype(np.int64))

    def hf(n):
        with torch.no_grad():
            ref.generate(tid, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    httft = timed(lambda: hf(1))
    hfull = timed(lambda: hf(args.new))
    theirs = {"ttft_s": httft, "prefill_tok_s": args.prompt / httft, "decode_tok_s": (args.new - 1) / (hfull - httft)}
    both_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = jax.devices()[0].platform
    print(f"device: {dev} (JAX), torch CPU; config: 4 layers, d=512, 16 experts, vocab 32000; {args.dtype}; "
          f"prompt {args.prompt}, {args.new} new tokens")
    print(f"{'':14s}{'TTFT s':>10s}{'prefill tok/s':>16s}{'decode tok/s':>15s}")
    for name, r in (("gptoss-jax", ours), ("transformers", theirs)):
        print(f"{name:14s}{r['ttft_s']:10.3f}{r['prefill_tok_s']:16.1f}{r['decode_tok_s']:15.1f}")
    print(f"ratio (ours / transformers): prefill {ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x, "
          f"decode {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x")
    print(f"peak RSS: after gptoss-jax {jax_peak / 2**20:.0f} MiB; after both {both_peak / 2**20:.0f} MiB")
    print(json.dumps({"device": dev, "ours": ours, "transformers": theirs, "peak_rss_jax": jax_peak}))


if __name__ == "__main__":
    sys.exit(main())
