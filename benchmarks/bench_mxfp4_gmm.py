"""Benchmark of the MXFP4 grouped matmul (`pallas_kernels.mxfp4_gmm`) at gpt-oss shapes.

On a GPU/TPU: times `gmm` (Triton / Mosaic kernel) against `jax.lax.ragged_dot` on
pre-dequantized bf16 weights (and megablox `gmm` on TPU), and reports achieved HBM bandwidth and
% of the roofline bound. On CPU it prints ONLY static figures (bytes per call, roofline lower
bounds per target, and with --aot the compiled kernels' registers / spills / VMEM), clearly
labelled as static: no speed is ever measured on CPU or in interpret mode.

    python benchmarks/bench_mxfp4_gmm.py                 # device timings, or static table on CPU
    python benchmarks/bench_mxfp4_gmm.py --aot           # + deviceless compile figures (CPU ok)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.mxfp4_gmm import layout  # noqa: E402

# Peak figures (dense, per chip / per GPU) used for the roofline bounds.
TARGETS = {
    "h100": {"hbm_Bps": 3.35e12, "bf16_flops": 989e12, "name": "H100 SXM"},
    "v5e": {"hbm_Bps": 819e9, "bf16_flops": 197e12, "name": "TPU v5e"},
    "v6e": {"hbm_Bps": 1640e9, "bf16_flops": 918e12, "name": "TPU v6e"},
}
HIDDEN = INTERMEDIATE = 2880
TOP_K = 4
DECODE_TOKENS = (1, 8, 64)
PREFILL_TOKENS = 4096


def expected_active(experts: int, tokens: int) -> float:
  """Expected number of distinct experts hit by `tokens` uniformly routed tokens (top-4 each)."""
  return experts * (1.0 - (1.0 - TOP_K / experts) ** tokens)


def call_bytes(experts_active: float, rows: int, proj: str, act_bytes: int = 2) -> dict:
  k = HIDDEN if proj == "gate_up" else INTERMEDIATE
  n = 2 * INTERMEDIATE if proj == "gate_up" else HIDDEN
  kp = -(-k // layout.CHUNK_K) * layout.CHUNK_K
  w_expert = n * (kp // 8) * 4 + n * (kp // layout.CHUNK_K) * 4  # prepared layout bytes
  n_out = n // 2 if proj == "gate_up" else n
  x = rows * k * act_bytes
  out = rows * n_out * act_bytes
  return {"weights": experts_active * w_expert, "weights_bf16": experts_active * n * k * 2, "x": x, "out": out,
          "total": experts_active * w_expert + x + out, "flops": 2.0 * rows * k * n}


def static_table(experts_list=(32, 128)):
  print("STATIC FIGURES (bounds computed from byte/flop counts; nothing is timed)")
  hdr = f"{'E':>4} {'proj':>8} {'tokens':>6} {'rows':>6} {'act.exp':>7} {'MB/call':>8} {'GFLOP':>7}"
  hdr += "".join(f" {t + ' bound us':>14}" for t in TARGETS)
  print(hdr)
  for e in experts_list:
    for proj in ("gate_up", "down"):
      for tok in (*DECODE_TOKENS, PREFILL_TOKENS):
        rows = tok * TOP_K
        act = expected_active(e, tok)
        b = call_bytes(act, rows, proj)
        line = f"{e:>4} {proj:>8} {tok:>6} {rows:>6} {act:>7.1f} {b['total'] / 1e6:>8.1f} {b['flops'] / 1e9:>7.1f}"
        for t in TARGETS.values():
          bound = max(b["total"] / t["hbm_Bps"], b["flops"] / t["bf16_flops"])
          line += f" {bound * 1e6:>14.1f}"
        print(line)


def aot_table():
  from pallas_kernels.mxfp4_gmm import aot
  print("\nSTATIC COMPILE FIGURES (deviceless AOT compiles; registers/spills from ptxas -v on the "
        "Triton kernel's PTX, VMEM = kernel block footprint)")
  for target in ("h100", "v5e", "v6e", "tpu7x"):
    if not aot.toolchain_available(target):
      print(f"{target}: toolchain not installed, skipped")
      continue
    for proj in ("gate_up", "down"):
      for m in (4, 32, 256, 16384):
        r = aot.run_subprocess(target, 32, m, proj)
        if target == "h100":
          extra = (f"regs={r['registers']} spill_st={r['spill_store_bytes']} spill_ld={r['spill_load_bytes']} "
                   f"warps={r['num_warps']} mma={','.join(r['mma_instructions'])}")
        else:
          extra = f"vmem={r['vmem_bytes'] / 2**20:.2f}MiB (limit {r['vmem_limit_bytes'] / 2**20:.0f}MiB)"
        print(f"{target:>6} {proj:>8} M={m:>6} tile={r['tiling']['bm']}x{r['tiling']['bn']} {extra}")


def _routing(rng, experts: int, tokens: int):
  choice = np.stack([rng.choice(experts, TOP_K, replace=False) for _ in range(tokens)]).reshape(-1)
  return np.bincount(choice, minlength=experts).astype(np.int32)


def device_bench(experts: int, iters: int):
  from pallas_kernels import mxfp4_gmm
  from pallas_kernels import mxfp4
  backend = jax.default_backend()
  target = "h100" if backend == "gpu" else ("v6e" if "v6" in jax.devices()[0].device_kind.lower() else "v5e")
  peak = TARGETS[target]
  print(f"DEVICE TIMINGS on {jax.devices()[0].device_kind} (roofline peaks of {peak['name']})")
  rng = np.random.default_rng(0)
  for proj in ("gate_up", "down"):
    k = HIDDEN if proj == "gate_up" else INTERMEDIATE
    n = 2 * INTERMEDIATE if proj == "gate_up" else HIDDEN
    blocks, scales = mxfp4.random_packed_np(rng, (experts, n, k))
    w = mxfp4_gmm.prepare(blocks, scales, interleaved_glu=proj == "gate_up")
    wd = jnp.swapaxes(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jnp.bfloat16)
                      .reshape(experts, n, k), 1, 2)
    bias = jnp.zeros((experts, n), jnp.bfloat16)
    for tok in (*DECODE_TOKENS, PREFILL_TOKENS):
      rows = tok * TOP_K
      gs = jnp.asarray(_routing(rng, experts, tok))
      x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
      if proj == "gate_up":
        f = jax.jit(lambda x, gs: mxfp4_gmm.gmm(x, w, gs, bias=bias, epilogue="swiglu",
                                                swiglu_alpha=1.702, swiglu_limit=7.0))
      else:
        rw = jnp.ones((rows,), jnp.float32)
        f = jax.jit(lambda x, gs: mxfp4_gmm.gmm(x, w, gs, bias=bias, row_weights=rw))
      g = jax.jit(lambda x, gs: jax.lax.ragged_dot(x, wd, gs, preferred_element_type=jnp.float32)
                  .astype(jnp.bfloat16))
      res = {"mxfp4_gmm": _time(f, x, gs, iters), "ragged_dot_bf16": _time(g, x, gs, iters)}
      if backend == "tpu":
        from jax.experimental.pallas.ops.tpu.megablox import gmm as mb
        tm = 128 if rows >= 128 else max(8, rows // 8 * 8 or 8)
        xm = x if rows % tm == 0 else jnp.pad(x, ((0, -rows % tm), (0, 0)))
        # megablox needs tiles dividing K and N: K = 2880 is not a multiple of 128 -> full-K tile
        tiling = (tm, k, 128 if n % 128 == 0 else n)
        h = jax.jit(lambda x, gs: mb.gmm(x, wd, gs, preferred_element_type=jnp.bfloat16, tiling=tiling))
        try:
          res["megablox_bf16"] = _time(h, xm, gs, iters)
        except Exception as exc:  # report, keep benchmarking the others
          print(f"megablox gmm failed at {proj} tokens={tok}: {type(exc).__name__}: {exc}"[:300])
      act = int(np.count_nonzero(np.asarray(gs)))
      b = call_bytes(act, rows, proj)
      bound = max(b["total"] / peak["hbm_Bps"], b["flops"] / peak["bf16_flops"])
      for name, sec in res.items():
        # bytes this implementation moves (baselines read dense bf16 weights)
        wbytes = b["total"] if name == "mxfp4_gmm" else b["total"] - b["weights"] + b["weights_bf16"]
        print(f"E={experts} {proj:>8} tokens={tok:>5} {name:>16}: {sec * 1e6:9.1f} us  "
              f"{wbytes / sec / 1e9:7.1f} GB/s  {100 * bound / sec:5.1f}% of mxfp4 roofline")


def _time(f, x, gs, iters):
  jax.block_until_ready(f(x, gs))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = f(x, gs)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--aot", action="store_true", help="also run deviceless compiles for static figures")
  a = ap.parse_args()
  if jax.default_backend() in ("gpu", "tpu"):
    device_bench(a.experts, a.iters)
  else:
    print("No GPU/TPU: static figures only (no timings on CPU / interpret mode).")
    static_table()
    if a.aot:
      aot_table()


if __name__ == "__main__":
  main()
