"""Tests for pallas_kernels.paged_attention.

* interpret-mode numerics of both kernel bodies (impl="triton_interpret", "mosaic_interpret")
  and of the pure-jnp reference against an independent float64 numpy computation (contiguous
  K/V materialised page by page from the pool, plain masked softmax with the sink column), for
  page sizes 16 / 32 / 128 and rows whose lengths cross page and window boundaries (1, S-1, S,
  S+1, several pages, beyond the window), windows None / 128 / S / < S, GQA 1 / 4 / 8, sinks
  normal / large / -inf / mixed, T = 1 and chunks of T > 1 (several q blocks), shuffled block
  tables, empty rows and rows with n_new < T;
* what must never be read is poisoned with NaN: pool pages outside every row's visible range,
  block-table entries past a row's pages and before its window (they point at NaN pages), the
  last page's tail, the first page's slots before the window, the query rows t >= n_new; their
  outputs must be exact zeros;
* the Mosaic interpreter runs with eager DMAs and checks that every semaphore is back to zero at
  kernel exit (a DMA started and never waited, or waited twice);
* the `pl.CostEstimate` of both kernels; argument errors;
* @pytest.mark.aot: real deviceless compiles at gpt-oss shapes for TPU v5e / v6e / tpu7x and
  H100 (ptxas: registers, spills, MMA instructions).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from pallas_kernels import cost, gpu_targets
from pallas_kernels import paged_attention as pa
from pallas_kernels.impl import Impl
from pallas_kernels.mxfp4_gmm import aot as aot_tools
from pallas_kernels.paged_attention import common, reference
from pallas_kernels.paged_attention import tpu as tpu_mod
from pallas_kernels.paged_attention import triton as triton_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SINKS = ("normal", "large_pos", "large_neg", "neginf", "mixed")


def _sinks(kind, n, rng):
  base = rng.standard_normal(n)
  return {"normal": base * 2.0, "large_pos": 30.0 + base, "large_neg": -30.0 + base,
          "neginf": np.full(n, -np.inf),
          "mixed": np.where(np.arange(n) % 2 == 0, -np.inf, base * 3.0)}[kind].astype(np.float32)


def make_case(*, S, window, G, T, rows, sink="normal", K=2, H=32, dtype=np.float32, seed=0,
              spare_pages=3):
  """Random paged inputs. rows: [(q_start, n_new)] per row. Each row's pages are distinct pool
  pages in shuffled order; everything no valid query may see is NaN (see the module docstring).
  Returns (args tuple, window)."""
  rng = np.random.default_rng(seed)
  B = len(rows)
  N = K * G
  M = max(-(-(qs + max(nn, 1)) // S) for qs, nn in rows) + 1
  need = [-(-(qs + nn) // S) for qs, nn in rows]
  P = sum(need) + spare_pages
  perm = rng.permutation(P)
  k_pages = np.full((P, S, K, H), np.nan, np.float32)
  v_pages = np.full((P, S, K, H), np.nan, np.float32)
  nan_pages = perm[sum(need):]  # never referenced by a visible position
  bt = np.zeros((B, M), np.int32)
  used = 0
  for b, (qs, nn) in enumerate(rows):
    mine = perm[used:used + need[b]]
    used += need[b]
    L = qs + nn
    lo = 0 if window is None or nn == 0 else max(qs - window + 1, 0)  # first visible key
    for j in range(M):
      if j < need[b] and (j + 1) * S > lo:
        bt[b, j] = mine[j]
      else:  # past the row's pages or wholly before its window: a page of NaN
        bt[b, j] = rng.choice(nan_pages)
    for p in range(lo, L):  # only the visible positions hold numbers
      k_pages[bt[b, p // S], p % S] = rng.standard_normal((K, H))
      v_pages[bt[b, p // S], p % S] = rng.standard_normal((K, H))
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  for b, (_, nn) in enumerate(rows):
    q[b, nn:] = np.nan  # invalid query rows: never used, output exact zeros
  sinks = _sinks(sink, N, rng)
  cast = lambda x: jnp.asarray(x, dtype)
  q_start, n_new = (jnp.asarray([r[i] for r in rows], jnp.int32) for i in (0, 1))
  args = (cast(q), cast(k_pages), cast(v_pages), jnp.asarray(bt), q_start, n_new,
          jnp.asarray(sinks))
  return args, window


def dense_attention(q, k_pages, v_pages, bt, q_start, n_new, sinks, *, window, sm_scale):
  """Independent float64 computation: contiguous K/V of each row gathered position by position,
  softmax over [visible scores, sink]."""
  q, kp, vp, sinks = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                      for x in (q, k_pages, v_pages, sinks))
  bt, q_start, n_new = np.asarray(bt), np.asarray(q_start), np.asarray(n_new)
  B, T, N, H = q.shape
  S, K = kp.shape[1], kp.shape[2]
  G = N // K
  out = np.zeros((B, T, N, H))
  for b in range(B):
    L = int(q_start[b] + n_new[b])
    pos = np.arange(L)
    k = kp[bt[b, pos // S], pos % S]  # [L, K, H]
    v = vp[bt[b, pos // S], pos % S]
    for t in range(int(n_new[b])):
      i = q_start[b] + t
      vis = pos <= i
      if window is not None:
        vis &= pos > i - window
      kv_head = np.arange(N) // G
      s = np.einsum("nh,lnh->nl", q[b, t], k[vis][:, kv_head]) * sm_scale  # [N, l]
      m = np.maximum(s.max(axis=1), sinks)
      e = np.exp(s - m[:, None])
      den = e.sum(axis=1) + np.exp(sinks - m)
      out[b, t] = np.einsum("nl,lnh->nh", e, v[vis][:, kv_head]) / den[:, None]
  return out


def _check(out, args, window, *, atol=2e-5, rtol=2e-5):
  q, n_new = args[0], np.asarray(args[5])
  H = q.shape[-1]
  want = dense_attention(*args, window=window, sm_scale=H ** -0.5)
  out = np.asarray(jnp.asarray(out, jnp.float32))
  assert out.shape == q.shape
  valid = np.arange(q.shape[1])[None, :] < n_new[:, None]
  assert np.all(out[~valid] == 0.0), "invalid query rows must be exact zeros"
  assert np.all(np.isfinite(out)), "NaN leaked from a page that must not be read"
  np.testing.assert_allclose(out, want, atol=atol, rtol=rtol)


def _run(args, window, impl):
  # one jit: eager dispatch would compile every small op of the wrapper separately
  f = jax.jit(lambda *a: pa.paged_attention(*a, window=window, sm_scale=a[0].shape[-1] ** -0.5,
                                            impl=impl))
  return f(*args)


# (name, make_case kwargs): each row of a case is one boundary; S = page size
CASES = [
    ("S16-full-G4-decode", dict(S=16, window=None, G=4, T=1, sink="normal",
                                rows=[(0, 1), (14, 1), (15, 1), (16, 1), (49, 1), (7, 0)])),
    ("S16-W16-G8-decode", dict(S=16, window=16, G=8, T=1, sink="large_pos",
                               rows=[(0, 1), (15, 1), (16, 1), (31, 1), (70, 1), (0, 0)])),
    ("S16-W5-G1-decode", dict(S=16, window=5, G=1, T=1, sink="neginf",
                              rows=[(3, 1), (18, 1), (20, 1), (47, 1)])),
    ("S32-W128-G8-decode", dict(S=32, window=128, G=8, T=1, sink="mixed",
                                rows=[(126, 1), (127, 1), (128, 1), (129, 1), (300, 1)])),
    ("S128-W128-G4-decode", dict(S=128, window=128, G=4, T=1, sink="large_neg",
                                 rows=[(0, 1), (126, 1), (127, 1), (128, 1), (300, 1)])),
    ("S16-W16-G4-chunk", dict(S=16, window=16, G=4, T=20, sink="normal",
                              rows=[(0, 20), (7, 13), (33, 20), (16, 1), (5, 0)])),
    ("S16-full-G8-chunk", dict(S=16, window=None, G=8, T=12, sink="mixed",
                               rows=[(0, 12), (15, 12), (40, 5)])),
    # T*G = 288 > 256 rows: two Mosaic q blocks; nine Triton q blocks
    ("S32-W40-G4-chunk-qblocks", dict(S=32, window=40, G=4, T=72, sink="normal",
                                      rows=[(0, 72), (90, 70)])),
]
KERNEL_IMPLS = ("triton_interpret", "mosaic_interpret")


_REFERENCE_OUT = {}


@pytest.mark.parametrize("impl", ("reference",) + KERNEL_IMPLS)
@pytest.mark.parametrize("name,case", CASES, ids=[c[0] for c in CASES])
def test_numerics_vs_dense(name, case, impl, capfd):
  """Each impl against the float64 computation; the kernels also against the reference."""
  args, window = make_case(**case, seed=len(name))
  out = _run(args, window, impl)
  _check(out, args, window)
  if impl == "reference":
    _REFERENCE_OUT[name] = out
    return
  ref = _REFERENCE_OUT.get(name)
  if ref is None:
    ref = _REFERENCE_OUT.setdefault(name, _run(args, window, "reference"))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  if impl == "mosaic_interpret":  # the interpreter reports unbalanced DMA semaphores at exit
    assert "non-zero count" not in capfd.readouterr().out


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_bf16(impl):
  case = dict(S=16, window=16, G=8, T=3, sink="normal", rows=[(0, 3), (29, 3), (50, 2)])
  args, window = make_case(**case, dtype=jnp.bfloat16, seed=5)
  out = _run(args, window, impl)
  assert out.dtype == jnp.bfloat16
  _check(out, args, window, atol=3e-2, rtol=3e-2)
  # same probabilities-in-bf16 rounding as the reference: much closer to it than to f64
  ref = _run(args, window, "reference")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_modes(num_splits):
  """num_splits = 1 normalises in the kernel (many programs); > 1 merges partials in XLA."""
  args, window = make_case(S=16, window=None, G=4, T=2, sink="mixed",
                           rows=[(0, 2), (40, 1), (17, 2), (3, 0)], seed=11)
  out = jax.jit(lambda *a: triton_mod.paged_attention(
      *a, window=window, sm_scale=32 ** -0.5, num_splits=num_splits, interpret=True))(*args)
  _check(out, args, window)


def test_mosaic_one_page_per_step():
  """R = 1 page per DMA step: many steps per row, the double buffer alternates slots across
  rows (cross-row prefetch) and rows without queries in between."""
  args, window = make_case(S=16, window=None, G=4, T=1, sink="normal",
                           rows=[(40, 1), (0, 0), (3, 1), (33, 1), (0, 0), (0, 0), (17, 1)],
                           seed=13)
  out = jax.jit(lambda *a: tpu_mod.paged_attention(
      *a, window=window, sm_scale=32 ** -0.5, pages_per_step=1, interpret=True))(*args)
  _check(out, args, window)


def test_large_sink_suppresses_attention():
  args, window = make_case(S=16, window=16, G=4, T=1, rows=[(20, 1), (3, 1)], seed=2)
  args = args[:6] + (jnp.full_like(args[6], 80.0),)
  out = _run(args, window, "triton_interpret")
  assert float(jnp.max(jnp.abs(out))) < 1e-20


def test_reference_gathers_only_the_window():
  """With a window the XLA path gathers max_pages_spanned pages per row, not all M."""
  args, window = make_case(S=16, window=16, G=4, T=1, rows=[(200, 1), (5, 1)], seed=3)
  jaxpr = str(jax.make_jaxpr(lambda *a: reference.paged_attention(
      *a, window=window, sm_scale=0.2))(*args))
  n = common.max_pages_spanned(1, 16, 16, args[3].shape[1])
  assert n == 2 and f"2,{n * 16},2,32" in jaxpr.replace(" ", "")


def test_page_and_key_ranges():
  kw = dict(block_q=4, window=8, page_size=16, max_pages=10)
  # queries at 30..33 see keys 23..33: pages 1..2
  assert [int(x) for x in common.key_range(30, 4, 0, block_q=4, window=8)] == [23, 34]
  assert [int(x) for x in common.page_range(30, 4, 0, **kw)] == [1, 3]
  assert [int(x) for x in common.page_range(30, 2, 4, **kw)] == [0, 0]  # no valid query: empty
  assert [int(x) for x in common.page_range(0, 1, 0, **dict(kw, window=None))] == [0, 1]
  # decode with a window reads at most ceil(W / S) + 1 pages
  for W, S in [(128, 128), (128, 16), (5, 16), (129, 128)]:
    worst = max(int(np.subtract(*common.page_range(p, 1, 0, block_q=1, window=W, page_size=S,
                                                   max_pages=10 ** 6)[::-1]))
                for p in range(0, W + 4 * S))
    assert worst == common.max_pages_spanned(1, W, S, 10 ** 6) <= -(-W // S) + 1


def test_errors_name_the_input():
  args, _ = make_case(S=16, window=None, G=4, T=1, rows=[(3, 1)])
  q, kp, vp, bt, qs, nn, s = args
  with pytest.raises(ValueError, match="block_tables_BM"):
    pa.paged_attention(q, kp, vp, bt[0], qs, nn, s, window=None, sm_scale=0.1)
  with pytest.raises(ValueError, match="sinks_N"):
    pa.paged_attention(q, kp, vp, bt, qs, nn, s[:3], window=None, sm_scale=0.1)
  with pytest.raises(ValueError, match="window"):
    pa.paged_attention(q, kp, vp, bt, qs, nn, s, window=0, sm_scale=0.1)
  with pytest.raises(ValueError, match="GQA"):
    pa.paged_attention(q[:, :, :3], kp, vp, bt, qs, nn, s[:3], window=None, sm_scale=0.1)
  with pytest.raises(ValueError, match="renamed"):
    pa.paged_attention(*args, window=None, sm_scale=0.1, impl="interpret")
  assert pa.resolve_impl("auto") is pa.CPU_DEFAULT_IMPL is Impl.TRITON_INTERPRET


@pytest.mark.parametrize("impl", ["triton", "mosaic"])
@pytest.mark.parametrize("window", [None, 16])
def test_cost_estimate(impl, window):
  """flops = 2 matmuls x 2 H per visible (query head, key) pair of the typical case (a full
  block table, the T queries last), one exp per pair, bytes >= q + o + the K/V pages read."""
  B, T, N, K, H, S, M, P = 2, 3, 8, 2, 32, 16, 6, 20
  sd = jax.ShapeDtypeStruct
  args = (sd((B, T, N, H), jnp.bfloat16), sd((P, S, K, H), jnp.bfloat16),
          sd((P, S, K, H), jnp.bfloat16), sd((B, M), jnp.int32), sd((B,), jnp.int32),
          sd((B,), jnp.int32), sd((N,), jnp.float32))
  (name, ce), = cost.traced_cost_estimates(
      lambda *a: pa.paged_attention(*a, window=window, sm_scale=0.1, impl=impl), *args)
  assert name == ("paged_attention_tpu" if impl == "mosaic" else "paged_attention")
  L = M * S
  pairs = sum(min(p + 1, window or p + 1) for p in range(L - T, L))
  assert ce.flops == 4 * H * B * N * pairs and ce.transcendentals == B * N * pairs
  k_lo = 0 if window is None else L - T - window + 1  # one q block: the band of all T queries
  pages = (L - 1) // S + 1 - k_lo // S
  kv = 2 * B * pages * S * K * H * 2
  qo = 2 * B * T * N * H * 2
  assert kv + qo <= ce.bytes_accessed <= kv + 5 * qo + 4096, (ce.bytes_accessed, kv, qo)


# ---------------------------------------------------------------------------------------------
# AOT: deviceless compiles at gpt-oss shapes (64 q heads, 8 kv heads, head dim 64, bf16)
# ---------------------------------------------------------------------------------------------
N_Q, N_KV, HD, PAGE = 64, 8, 64, pa.DEFAULT_PAGE_SIZE
# (name, B, T, M, window): decode of 8 rows with 128k-token block tables (full / sliding layer),
# a 512-token prefill chunk after cached pages (full / sliding); pool of 4096 pages (512k tokens)
AOT_CASES = [("decode_full", 8, 1, 1024, None), ("decode_w128", 8, 1, 1024, 128),
             ("chunk512_full", 1, 512, 256, None), ("chunk512_w128", 1, 512, 256, 128)]
POOL_PAGES = 4096


def _aot_specs(device, B, T, M, dtype=jnp.bfloat16):
  from jax.experimental.layout import Format, Layout
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(device)

  def sd(shape, dt):  # row-major, as device arrays given to jit (see mxfp4_gmm/aot.py)
    return jax.ShapeDtypeStruct(shape, dt, sharding=Format(Layout(tuple(range(len(shape)))), sh))
  return [sd((B, T, N_Q, HD), dtype), sd((POOL_PAGES, PAGE, N_KV, HD), dtype),
          sd((POOL_PAGES, PAGE, N_KV, HD), dtype), sd((B, M), jnp.int32), sd((B,), jnp.int32),
          sd((B,), jnp.int32), sd((N_Q,), jnp.float32)]


def _aot_compile(device, impl, name, B, T, M, window, dtype=jnp.bfloat16, dump=None, **kw):
  if kw:  # kernel-level options (vmem_limit_bytes)
    fn = lambda *a: tpu_mod.paged_attention(*a, window=window, sm_scale=HD ** -0.5, **kw)
  else:
    fn = lambda *a: pa.paged_attention(*a, window=window, sm_scale=HD ** -0.5, impl=impl)
  lowered = jax.jit(fn).lower(*_aot_specs(device, B, T, M, dtype))
  opts = None if dump is None else {"xla_dump_to": os.path.join(dump, name)}
  return lowered, lowered.compile(compiler_options=opts)


@pytest.mark.aot
@pytest.mark.parametrize("topo_name", ["v5e:2x2", "v6e:2x2", "tpu7x:2x2x1"])
def test_aot_tpu(topo_name):
  if not aot_tools.toolchain_available("v5e"):
    pytest.skip("libtpu (the `aot` extra) is not installed")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topo_name, platform="tpu").devices[0]
  pool = POOL_PAGES * PAGE * N_KV * HD * 2
  # (the sliding chunk is the full chunk's kernel with another range and mask: H100 only, CI time)
  for name, B, T, M, window in AOT_CASES[:3]:
    # every compile runs under the generation's default scoped-VMEM limit (Mosaic rejects a
    # kernel that does not fit)
    lowered, compiled = _aot_compile(device, "mosaic", name, B, T, M, window)
    assert "paged_attention_tpu" in compiled.as_text(), name
    # the pools are read in place (no relayout copy: temporaries far below one pool)
    assert compiled.memory_analysis().temp_size_in_bytes < pool // 16, name
    (ce,) = cost.mosaic_cost_estimates(lowered.as_text())  # reaches XLA's TPU scheduler
    L = M * PAGE
    pairs = sum(min(p + 1, window or p + 1) for p in range(L - T, L))
    assert ce["flops"] == 4 * HD * B * N_Q * pairs, name
  if topo_name.startswith("v5e"):  # headroom: decode, under v5e's 16 MiB default scoped VMEM,
    # fits in 14 MiB (it needs ~12.2; 512-row chunks ask for 32 MiB and need ~21.4)
    name, B, T, M, window = AOT_CASES[0]
    _aot_compile(device, "mosaic", name, B, T, M, window, vmem_limit_bytes=14 << 20)


@pytest.mark.aot
def test_aot_h100_ptxas(tmp_path):
  if not gpu_targets.cuda_toolchain_available():
    pytest.skip("jax-cuda12-plugin / nvcc (the `aot` extra) missing")
  # the CUDA topology needs JAX_PLATFORMS=cpu at jax import: compile in a fresh interpreter
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, os.path.abspath(__file__), "--h100-dump", str(tmp_path)],
                 env=env, check=True, cwd=REPO, timeout=600)
  seen = {}
  for case in [c[0] for c in AOT_CASES] + ["chunk512_f32"]:
    ptx = [f for f in glob.glob(str(tmp_path / case / "*.ptx"))
           if ".entry paged_attention(" in open(f).read()]
    assert len(ptx) == 1, (case, ptx)
    src = open(ptx[0]).read()
    assert ".target sm_90a" in src and "tf32" not in src, case
    mma = set(gpu_targets.mma_instructions(src))
    if case.endswith("f32"):  # f32 pages: true f32 products on FMA, no reduced precision
      assert not any(".bf16" in x or ".f16" in x for x in mma), (case, mma)
    else:
      assert mma and all(".bf16.bf16" in x for x in mma), (case, mma)
    st = gpu_targets.run_ptxas(ptx[0], "h100")
    assert st["ptxas_rc"] == 0, (case, st)
    assert st["spill_store_bytes"] == 0 and st["spill_load_bytes"] == 0, (case, st)
    assert st["registers"] is not None and st["registers"] <= 255, (case, st)
    seen[case] = (st["registers"], sorted(mma))
  print("H100 ptxas:", seen)


def _h100_compile(dump_root):
  device = gpu_targets.topology_devices("h100", 1)[0]
  for name, B, T, M, window in AOT_CASES:
    _aot_compile(device, "triton", name, B, T, M, window, dump=dump_root)
  _aot_compile(device, "triton", "chunk512_f32", 1, 512, 256, 128, dtype=jnp.float32, dump=dump_root)


if __name__ == "__main__":
  assert sys.argv[1] == "--h100-dump"
  _h100_compile(sys.argv[2])
