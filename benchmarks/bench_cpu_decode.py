"""Batch-1 decode of the full-size gpt-oss-20b on a CPU-only host against the host's memory-bandwidth
bound, in one run: **CPU figures** (XLA:CPU, whatever cores this host has).

    python benchmarks/bench_cpu_decode.py [--ckpt /work/ckpt20b] [--prompt 128] [--new 32] [--json]

- makes the random 20b checkpoint in the released layout (`gptoss-jax make-random-checkpoint`, in a
  subprocess) unless `--ckpt` already holds one;
- host copy bandwidth: numpy copy of a 512 MiB array, bytes read + written per second (best of 5),
  measured before the load and after the decode runs; the bound takes the higher one;
- bytes a decode token reads: every weight a token touches (attention, router, the k routed experts'
  packed MXFP4 blocks and scales, lm_head, one embedding row, norms and biases) plus the KV cache at
  the measured context; the bound is bandwidth / those bytes;
- load time (`load_model`), peak RSS of this process over load and decode (ru_maxrss), prefill
  tokens/s (the prompt, one chunk) and decode tokens/s (greedy, stop tokens off: the difference of
  two generate() calls in the same decode bucket, compiles excluded), and decode / bound;
- `uptime` before and after: the host may be shared, and other work lowers both the measured
  bandwidth and the decode rate.

Needs ~13 GiB of free memory for the 20b (parameters 12.8 GiB); `--ckpt` any other checkpoint works too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

GIB = 1 << 30
BANDWIDTH_BYTES = 512 << 20


def host_copy_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeat: int = 5) -> float:
    """Bytes read + written per second by numpy's copy of an nbytes array (best of `repeat`)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode_bytes_per_token(model, context: int) -> dict:
    """Bytes one batch-1 decode step reads at `context` cached positions, by part."""
    import jax.numpy as jnp
    from flax import nnx

    cfg = model.config
    parts = {"attention": 0, "router": 0, "experts": 0, "lm_head": 0, "embedding": 0, "other": 0, "kv_cache": 0}
    k_over_e = cfg.num_experts_per_tok / cfg.num_local_experts
    for path, var in nnx.to_flat_state(nnx.state(model)):
        leaf = var.get_value() if hasattr(var, "get_value") else var.value
        n = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        name = str(path[-1])
        if "mlp" in map(str, path) and name in ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales", "b1", "b2"):
            parts["experts"] += n * k_over_e
        elif name in ("wr_DE", "br_E"):
            parts["router"] += n
        elif name.startswith(("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "sinks")):
            parts["attention"] += n
        elif name == "lm_head_VD":
            parts["lm_head"] += n
        elif name == "embed_VD":
            parts["embedding"] += n // cfg.vocab_size  # one row
        else:
            parts["other"] += n
    kv_row = 2 * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(model.dtype).itemsize  # k and v, one position
    for i in range(cfg.num_hidden_layers):
        w = cfg.window(i)
        parts["kv_cache"] += kv_row * (context if w is None else min(w, context))
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def ensure_checkpoint(path: str, preset: str) -> bool:
    """Make a random `preset` checkpoint at `path` (a subprocess, so its memory stays out of this
    process's peak) unless one is there. Returns whether it was made now."""
    if os.path.exists(os.path.join(path, "config.json")):
        return False
    cmd = [sys.executable, "-m", "gptoss_jax.cli", "make-random-checkpoint", "--preset", preset, path]
    print(f"writing a random {preset} checkpoint to {path} ...", file=sys.stderr)
    subprocess.run(cmd, check=True)
    return True


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="/work/ckpt20b", help="checkpoint folder (made if missing)")
    ap.add_argument("--preset", default="gpt-oss-20b", help="preset of the checkpoint made when missing")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (one prefill chunk)")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded in the timed run (2..bucket)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each (best taken)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args()

    from gptoss_jax.platforms import start_jax

    start_jax()  # the CPU alone on a host without accelerators, quietly
    import jax

    from gptoss_jax import load_model
    from gptoss_jax.generate import decode_bucket, generate

    load_before = uptime()
    made = ensure_checkpoint(args.ckpt, args.preset)
    bandwidth = host_copy_bandwidth()

    t = time.perf_counter()
    model = load_model(args.ckpt, dtype=args.dtype, kernels="xla", progress=False)
    load_s = time.perf_counter() - t
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.prompt)).astype(np.int32)
    bucket = decode_bucket(args.new)
    short = 2 if bucket == decode_bucket(2) else bucket // 2 + 1  # args.new's bucket: one decode compile
    if args.new - short < 2:
        raise SystemExit(f"--new {args.new}: use at least {short + 2} (or at most 16) to time two tokens or more")

    def run(n):
        out = generate(model, ids, max_new_tokens=n, temperature=0.0, stop_tokens=())
        assert out.tokens.shape == (1, n)

    t = time.perf_counter()
    run(1)  # compiles prefill (and the first decode bucket)
    run(short)
    run(args.new)
    compile_s = time.perf_counter() - t
    prefill_s = min(timed(lambda: run(1)) for _ in range(args.repeat))[0]
    short_s, short_cpu = min(timed(lambda: run(short)) for _ in range(args.repeat))
    long_s, long_cpu = min(timed(lambda: run(args.new)) for _ in range(args.repeat))
    decode_tok_s = (args.new - short) / (long_s - short_s)
    decode_cpu_s = (long_cpu - short_cpu) / (args.new - short)  # CPU time a token costs, all cores
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    read = decode_bytes_per_token(model, args.prompt + args.new)
    del model  # the parameters' memory back before the copy's arrays are made
    gc.collect()
    bandwidth_after = host_copy_bandwidth()
    bound_tok_s = max(bandwidth, bandwidth_after) / read["total"]
    result = {
        "device": f"CPU ({jax.devices()[0].device_kind}, {os.cpu_count()} cores): CPU figures",
        "checkpoint": args.ckpt, "made_checkpoint": made, "dtype": args.dtype,
        "layers": cfg.num_hidden_layers, "prompt_tokens": args.prompt, "new_tokens": args.new,
        "host_copy_bandwidth_GBps": max(bandwidth, bandwidth_after) / 1e9,
        "host_copy_bandwidth_before_after_GBps": [bandwidth / 1e9, bandwidth_after / 1e9],
        "decode_bytes_per_token_GB": read["total"] / 1e9,
        "decode_bytes_by_part_GB": {k: v / 1e9 for k, v in read.items() if k != "total"},
        "bandwidth_bound_tok_s": bound_tok_s,
        "load_s": load_s, "compile_s": compile_s,
        "prefill_tok_s": args.prompt / prefill_s,
        "decode_tok_s": decode_tok_s,
        "decode_ms_per_token": 1e3 / decode_tok_s,
        "decode_cpu_s_per_token": decode_cpu_s,
        "fraction_of_bound": decode_tok_s / bound_tok_s,
        "peak_rss_after_load_GB": rss_load / 1e9,
        "peak_rss_GB": rss_peak / 1e9,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "uptime_before": load_before, "uptime_after": uptime(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))
    print()
    print(f"| CPU figures ({result['device']}) | measured |")
    print("| --- | --- |")
    rows = [("host copy bandwidth (numpy, read + write; best of before / after)",
             f"{max(bandwidth, bandwidth_after) / 1e9:.1f} GB/s ({bandwidth / 1e9:.1f} / {bandwidth_after / 1e9:.1f})"),
            ("bytes read per decode token", f"{read['total'] / 1e9:.2f} GB"),
            ("bandwidth bound", f"{bound_tok_s:.2f} tokens/s"),
            ("load time", f"{load_s:.0f} s"),
            (f"prefill ({args.prompt} tokens)", f"{args.prompt / prefill_s:.1f} tokens/s"),
            ("decode (batch 1, greedy)", f"{decode_tok_s:.2f} tokens/s ({1e3 / decode_tok_s:.0f} ms per token)"),
            ("fraction of the bound", f"{100 * decode_tok_s / bound_tok_s:.0f}%"),
            ("CPU time per decode token (all cores)", f"{decode_cpu_s:.2f} s"),
            ("peak RSS (load + decode)", f"{rss_peak / 1e9:.1f} GB"),
            ("machine load (uptime)", result["uptime_after"].split("load average:")[-1].strip())]
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
