"""Bytes moved vs ideal and roofline bounds for pallas_kernels.banded_attention.

Static figures (always; computed from the kernels' tiling, no timing):
  * ideal bytes: q read once, o written once, K and V read once per kv head (sliding layers:
    only the band, decode: only the visible window of the cache);
  * kernel bytes: what the kernel's tiling actually loads (K/V band re-read per q block, TPU
    wrapper transposes of q / o);
  * roofline lower bound per target = max(bytes / HBM bandwidth, flops / bf16 MXU/TC peak).

Device timings (only when jax.default_backend() is "gpu" or "tpu"): the kernel vs
jax.nn.dot_product_attention (no sinks) and, on TPU, splash attention with LocalMask. Nothing is
ever timed on CPU or in interpret mode.

  python benchmarks/bench_banded_attention.py            # static figures (+ timings on a device)
"""
from __future__ import annotations

import argparse
import time

# name: (HBM bytes/s, dense bf16 flop/s)
TARGETS = {
    "H100-SXM": (3.35e12, 989e12),
    "TPU v5e": (819e9, 197e12),
    "TPU v6e": (1640e9, 918e12),
}
N, K, H, BF16 = 64, 8, 64, 2  # gpt-oss attention: 64 q heads, 8 kv heads, head dim 64


def _cdiv(a, b):
  return -(-a // b)


def _band_blocks(p_lo, p_hi, window, bk, s_len):
  lo = 0 if window is None else max(p_lo - window + 1, 0)
  hi = min(p_hi + 1, s_len)
  return max(0, _cdiv(hi, bk) - lo // bk)


def prefill_figures(T, window, target):
  """Bytes / flops for one layer, batch 1, bf16, S = T (no cache)."""
  G = N // K
  qo = 2 * T * N * H * BF16
  kv_once = 2 * T * K * H * BF16
  vis = sum(min(i + 1, window or (i + 1)) for i in range(T))  # visible keys summed over queries
  flops = 4 * N * H * vis  # QK^T and PV, 2 flops per MAC
  ideal = qo + kv_once
  if target == "gpu":  # Triton: BQ = 128 // G positions, BK = 64, one kv head per program
    bq, bk = 128 // G, 64
    blocks = sum(_band_blocks(t0, min(t0 + bq, T) - 1, window, bk, T) for t0 in range(0, T, bq))
    kv_loads = blocks * bk * K * H * BF16 * 2
    kernel = qo + kv_loads
    note = "K/V loads are L2-level; adjacent q blocks share the band, HBM traffic ~ ideal"
  else:  # Mosaic: BQ = 512 // G positions, BK = 128, all kv heads per program; q/o transposes
    bq, bk = 512 // G, 128
    blocks = sum(_band_blocks(t0, min(t0 + bq, T) - 1, window, bk, T) for t0 in range(0, T, bq))
    kv_loads = blocks * bk * K * H * BF16 * 2
    kernel = qo + kv_loads + 2 * qo  # + XLA fold/unfold transposes of q and o (read + write)
    note = "VMEM DMA = HBM traffic; includes the q/o fold transposes done by XLA"
  return dict(ideal=ideal, kernel=kernel, flops=flops, note=note)


def decode_figures(cache_len, S_cache, window, target, B=1):
  """Bytes / flops per decode step (T = 1) for B rows at the same cache_len."""
  visible = min(cache_len, S_cache) if window is None else min(cache_len, window - 1, S_cache)
  ideal = B * (2 * visible * K * H * BF16 + 2 * N * H * BF16)
  flops = B * 4 * N * H * (visible + 1)
  bk = 64 if target == "gpu" else 512
  bk = min(bk, S_cache)
  filled = min(cache_len, S_cache)
  if window is None or cache_len > S_cache:
    blocks = _cdiv(filled, bk)
  else:
    blocks = _cdiv(filled, bk) - max(cache_len - window + 1, 0) // bk
  kernel = B * (2 * blocks * bk * K * H * BF16 + 2 * N * H * BF16)
  return dict(ideal=ideal, kernel=kernel, flops=flops)


def roofline_us(nbytes, flops, target):
  bw, peak = TARGETS[target]
  return 1e6 * max(nbytes / bw, flops / peak), ("memory" if nbytes / bw > flops / peak
                                                  else "compute")


def static_report():
  print("=" * 100)
  print("STATIC FIGURES (analytic, from the kernels' tiling; NOT measurements)")
  print("=" * 100)
  print("\nPrefill, one layer, B=1, bf16, 64 q heads / 8 kv heads / H=64")
  print(f"{'case':<22}{'target':<10}{'ideal MB':>10}{'kernel MB':>11}{'ratio':>7}"
        f"{'GFLOP':>8}{'roofline us (ideal bytes)':>28}{'bound':>9}")
  for T, W in [(4096, 128), (4096, None), (32768, 128)]:
    for tgt in TARGETS:
      f = prefill_figures(T, W, "gpu" if tgt.startswith("H100") else "tpu")
      us, bound = roofline_us(f["ideal"], f["flops"], tgt)
      print(f"{f'T={T} W={W}':<22}{tgt:<10}{f['ideal'] / 1e6:>10.1f}{f['kernel'] / 1e6:>11.1f}"
            f"{f['kernel'] / f['ideal']:>7.2f}{f['flops'] / 1e9:>8.1f}{us:>28.1f}{bound:>9}")
  print("  gpu: " + prefill_figures(8, 4, "gpu")["note"])
  print("  tpu: " + prefill_figures(8, 4, "tpu")["note"])
  print("\nDecode, one layer, one new token per row (T=1), bf16 cache [B, S_cache, 8, 64]")
  print(f"{'case':<40}{'target':<10}{'ideal KB':>10}{'kernel KB':>11}{'ratio':>7}"
        f"{'roofline us':>13}{'bound':>9}")
  for B, L, Sc, W in [(1, 8192, 8192, None), (1, 32768, 32768, None), (1, 131072, 131072, None),
                      (1, 100000, 128, 128), (64, 8192, 8192, None), (64, 100000, 128, 128)]:
    for tgt in TARGETS:
      f = decode_figures(L, Sc, W, "gpu" if tgt.startswith("H100") else "tpu", B=B)
      us, bound = roofline_us(f["ideal"], f["flops"], tgt)
      print(f"{f'B={B} len={L} S_cache={Sc} W={W}':<40}{tgt:<10}{f['ideal'] / 1e3:>10.1f}"
            f"{f['kernel'] / 1e3:>11.1f}{f['kernel'] / f['ideal']:>7.2f}{us:>13.2f}{bound:>9}")


def _time(fn, *args, iters=20):
  out = fn(*args)
  out.block_until_ready()
  t = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  out.block_until_ready()
  return (time.perf_counter() - t) / iters * 1e6


def on_device() -> bool:
  """Whether an accelerator runs this benchmark; prints the timings' header, or why there are none."""
  import jax
  backend = jax.default_backend()
  if backend not in ("gpu", "cuda", "tpu"):
    print(f"\n[device timings skipped: backend is {backend!r}; no CPU / interpret timings]")
    return False
  print(f"\nDEVICE TIMINGS on {jax.devices()[0].device_kind} (mean of 20 runs after warm-up)")
  return True


def device_report():
  import jax
  import jax.numpy as jnp
  from pallas_kernels.banded_attention import attention, decode_attention
  if not on_device():
    return
  key = jax.random.PRNGKey(0)
  for T, W in [(4096, 128), (4096, None)]:
    q = jax.random.normal(key, (1, T, N, H), jnp.bfloat16)
    k = jax.random.normal(key, (1, T, K, H), jnp.bfloat16)
    v = jax.random.normal(key, (1, T, K, H), jnp.bfloat16)
    s = jnp.zeros((N,), jnp.float32)
    ours = jax.jit(lambda q, k, v, s: attention(q, k, v, s, window=W))
    lws = None if W is None else (W - 1, 0)
    base = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=lws))
    t1, t2 = _time(ours, q, k, v, s), _time(base, q, k, v)
    print(f"  prefill T={T} W={W}: banded {t1:.1f} us | dot_product_attention (no sinks) {t2:.1f} us")
    if backend == "tpu":
      from jax.experimental.pallas.ops.tpu.splash_attention import (
          splash_attention_kernel as sk, splash_attention_mask as sm)
      mask = sm.CausalMask((T, T)) if W is None else sm.LocalMask((T, T), (W - 1, 0), 0)
      kern = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * (N // K)))
      qs = q.reshape(T, K, N // K, H).transpose(1, 2, 0, 3)  # [K, G, T, H]
      ks, vs = k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2)
      ss = s.reshape(K, N // K)
      splash = jax.jit(jax.vmap(lambda q, k, v, s: kern(q, k, v, sinks=s)))
      print(f"    splash with sinks (GQA as per-kv-head MQA, q pre-scaled): "
            f"{_time(splash, qs, ks, vs, ss):.1f} us")
  for L, Sc, W in [(8192, 8192, None), (131072, 131072, None), (100000, 128, 128)]:
    q = jax.random.normal(key, (1, 1, N, H), jnp.bfloat16)
    kn = jax.random.normal(key, (1, 1, K, H), jnp.bfloat16)
    kc = jax.random.normal(key, (1, Sc, K, H), jnp.bfloat16)
    s = jnp.zeros((N,), jnp.float32)
    cl = jnp.array([L], jnp.int32)
    f = jax.jit(lambda q, kn, kc, cl: decode_attention(q, kn, kn, kc, kc, s, cl, window=W))
    print(f"  decode len={L} S_cache={Sc} W={W}: {_time(f, q, kn, kc, cl):.1f} us")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--static-only", action="store_true")
  a = ap.parse_args()
  static_report()
  if not a.static_only:
    device_report()


if __name__ == "__main__":
  main()
