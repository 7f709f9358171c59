"""Bytes moved vs ideal and roofline bounds for pallas_kernels.paged_attention.

Static figures (always; from the kernels' tiling, no timing):
  * ideal bytes: q read once, o written once, the visible keys' K and V read once per kv head
    (sliding layers: the window only);
  * kernel bytes: what the tiling moves: on H100 the visible keys' rows (loads are masked per
    key), the block-table entry gathered per key and kv head and the split-K partials (written +
    read by the XLA merge), per q block for chunks; on TPU whole pages of the visible range (one
    DMA per page) as stored in HBM, where the default layout of
    [P, S, K, H = 64] pads the head dim to 128 lanes (2x the logical bytes; measured from a
    deviceless compile's argument size), and for chunks one re-read of the band per block of
    512 folded query rows plus the XLA fold / unfold transposes of q / o;
  * roofline lower bound per target = max(bytes / HBM bandwidth, flops / dense bf16 peak), with
    the ideal bytes (H100: L2 serves the re-reads of concurrent q blocks) and, for TPU, the
    kernel bytes too (its DMAs are HBM traffic).

Device timings (only when jax.default_backend() is "gpu" or "tpu"): the paged kernel vs the XLA
path (``reference.paged_attention``: gather the pages, masked softmax) and vs the contiguous-cache
decode kernel (``banded_attention.decode_attention``) at the same lengths, as ratios. Nothing is
ever timed on CPU or in interpret mode.

  python benchmarks/bench_paged_attention.py            # static figures (+ timings on a device)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (pallas_kernels)

# the same targets (HBM bytes/s, dense bf16 flop/s), roofline and timer as the banded kernel's
from bench_banded_attention import BF16, TARGETS, H, K, N, _time, on_device, roofline_us  # noqa: E402
G = N // K
S = 128  # pallas_kernels.paged_attention.DEFAULT_PAGE_SIZE
TPU_LANE_PAD = 2  # [P, S, 8, 64] bf16 occupies 2x its bytes in TPU HBM (64 of 128 lanes)
TPU_ROWS = 512  # folded query rows per Mosaic chunk program (tpu.ROWS_PER_BLOCK)
SPLIT_ROWS = 16  # query rows of a Triton decode program (T = 1, G = 8 padded to the MMA minimum)


def _cdiv(a, b):
  return -(-a // b)


def _band(p_lo, p_hi, window):
  """(keys, pages) visible to query positions p_lo..p_hi: the key range and the pages
  holding it."""
  k_lo = 0 if window is None else max(p_lo - window + 1, 0)
  return p_hi + 1 - k_lo, p_hi // S + 1 - k_lo // S


def _blocks(L, T, bq, window, what):
  return sum(_band(L - T + t0, L - T + min(t0 + bq, T) - 1, window)[what] for t0 in range(0, T, bq))


def figures(B, L, T, window, target):
  """One layer, B rows each with L positions after this step (the last T are the queries)."""
  page_kv = S * K * H * BF16 * 2  # one page of K and V
  qo = 2 * B * T * N * H * BF16
  vis = sum(min(p + 1, window or p + 1) for p in range(L - T, L))  # (query, key) pairs per head
  keys = (L if window is None else min(L, T + window - 1))
  ideal = qo + B * keys * K * H * BF16 * 2
  flops = B * 4 * N * H * vis
  if target == "gpu":  # q blocks of 128 // G queries; L2 serves concurrent re-reads
    # loads are masked per key (one 128-byte row per key and kv head): only the visible keys
    # move, plus one 4-byte block-table entry per key and kv head
    n = _blocks(L, T, 1 if T == 1 else 128 // G, window, 0)
    kernel = qo + B * n * K * (2 * H * BF16 + 4)
    if T == 1:  # flash-decoding partials when B * K programs do not fill 132 SMs
      ns = 1 if B * K >= 132 else min(_cdiv(264, B * K), _cdiv(keys, 128) + 1)
      if ns > 1:
        kernel += 2 * B * K * ns * SPLIT_ROWS * (H + 2) * 4
  else:  # Mosaic: one DMA per page per q block, pages stored lane-padded, q/o folded by XLA
    pages = _blocks(L, T, T if T * G <= TPU_ROWS else TPU_ROWS // G, window, 1)
    kernel = qo * (1 if T == 1 else 3) + B * pages * page_kv * TPU_LANE_PAD
  return dict(ideal=ideal, kernel=kernel, flops=flops)


CASES = [  # (B, L, T, window)
    (1, 8192, 1, None), (1, 131072, 1, None), (64, 8192, 1, None), (64, 2048, 1, None),
    (64, 100000, 1, 128), (1, 8192 + 512, 512, None), (1, 32768 + 2048, 2048, None),
    (1, 32768 + 2048, 2048, 128),
]


def static_report():
  print("=" * 112)
  print("STATIC FIGURES (analytic, from the kernels' tiling; NOT measurements). One layer, bf16,")
  print(f"64 q heads / 8 kv heads / H = 64, page size S = {S}; B rows of L positions "
        "(the last T are the queries)")
  print("=" * 112)
  print(f"{'case':<30}{'target':<10}{'ideal MB':>10}{'kernel MB':>11}{'ratio':>7}{'GFLOP':>8}"
        f"{'bound us, ideal bytes':>24}{'bound us, kernel bytes':>25}")
  for B, L, T, W in CASES:
    for tgt in TARGETS:
      f = figures(B, L, T, W, "gpu" if tgt.startswith("H100") else "tpu")
      us_i, kind_i = roofline_us(f["ideal"], f["flops"], tgt)
      us_k, kind_k = roofline_us(f["kernel"], f["flops"], tgt)
      print(f"{f'B={B} L={L} T={T} W={W}':<30}{tgt:<10}{f['ideal'] / 1e6:>10.2f}"
            f"{f['kernel'] / 1e6:>11.2f}{f['kernel'] / f['ideal']:>7.2f}{f['flops'] / 1e9:>8.2f}"
            f"{f'{us_i:.1f} ({kind_i})':>24}{f'{us_k:.1f} ({kind_k})':>25}")
  print("  H100: 'kernel' counts L2-level loads for chunks (concurrent q blocks re-read the band);")
  print("  TPU: 'kernel' = HBM DMA traffic (lane-padded pages, band re-read per 512-row block).")


def device_report():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels.banded_attention import decode_attention
  from pallas_kernels.paged_attention import paged_attention, reference
  if not on_device():
    return
  key = jax.random.PRNGKey(0)
  for B, L, T, W in CASES:
    M = _cdiv(L, S)
    P = B * M
    q = jax.random.normal(key, (B, T, N, H), jnp.bfloat16)
    kp = jax.random.normal(key, (P, S, K, H), jnp.bfloat16)
    bt = jnp.asarray(np.random.default_rng(0).permutation(P).reshape(B, M), jnp.int32)
    qs = jnp.full((B,), L - T, jnp.int32)
    nn = jnp.full((B,), T, jnp.int32)
    s = jnp.zeros((N,), jnp.float32)
    kw = dict(window=W, sm_scale=H ** -0.5)
    ours = jax.jit(lambda q, kp, bt: paged_attention(q, kp, kp, bt, qs, nn, s, **kw))
    xla = jax.jit(lambda q, kp, bt: reference.paged_attention(q, kp, kp, bt, qs, nn, s, **kw))
    t_ours, t_xla = _time(ours, q, kp, bt), _time(xla, q, kp, bt)
    line = (f"  B={B} L={L} T={T} W={W}: paged {t_ours:.1f} us | XLA gather {t_xla:.1f} us "
            f"({t_xla / t_ours:.2f}x)")
    if T == 1:  # the contiguous-cache kernel on the same keys (cache before the new token)
      kc = kp[bt].reshape(B, M * S, K, H)
      kn = kc[:, L - 1:L]
      cl = jnp.full((B,), L - 1, jnp.int32)
      contiguous = jax.jit(lambda q, kn, kc: decode_attention(q, kn, kn, kc, kc, s, cl, **kw))
      t_c = _time(contiguous, q, kn, kc)
      line += f" | contiguous decode {t_c:.1f} us ({t_c / t_ours:.2f}x)"
    print(line)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--static-only", action="store_true")
  a = ap.parse_args()
  static_report()
  if not a.static_only:
    device_report()


if __name__ == "__main__":
  main()
