"""Tests of the MXFP4 grouped matmul.

Tier 1 (CPU, Pallas interpret mode): exact decoding of every e2m1 code at every E8M0 scale,
layout round trip, kernel numerics vs `reference.gmm_reference` (dequantize + ragged_dot) for
both kernel bodies (impl="mosaic_interpret" / "triton_interpret"), gradients vs `jax.grad` of the
reference, the shared impl vocabulary, the `pl.CostEstimate` attached to every pallas_call (traced
for all four kernel impls, checked against hand computations).

Tolerances: weights decode exactly (bf16 and f32 hold e2m1 * 2**k exactly), both sides
accumulate in f32, so
  * f32 (reference at Precision.HIGHEST): only the summation order differs:
    |err| <= K * eps_f32 * sum|x||w| -> rtol/atol 2e-5 relative to the output scale;
  * bf16: identical bf16 products and f32 sums, the output is rounded to bf16 once on each side
    and may land one bf16 ulp apart: |err| <= 2**-7 * |y| (+ the f32 reorder term), so
    atol = rtol = 2**-7 relative to the output scale.

Tier 2 (`-m aot`): real deviceless compiles at gpt-oss shapes for TPU v5e/v6e/tpu7x (libtpu) and
H100 (JAX CUDA plugin + ptxas), asserting VMEM fits, no relayout copies of the weights, the cost
estimate in the Mosaic custom call, zero spill bytes, bf16 MMA and no tf32 in the Triton
kernel's PTX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cost, mxfp4
from pallas_kernels import mxfp4_gmm
from pallas_kernels.impl import Impl
from pallas_kernels.mxfp4_gmm import aot, common, layout

ALPHA, LIMIT = 1.702, 7.0
KERNEL_IMPLS = ["mosaic_interpret", "triton_interpret"]


def _tol(dtype):
  return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 2.0**-7


def _assert_close(y, ref, dtype):
  y = np.asarray(jnp.asarray(y, jnp.float32))
  ref = np.asarray(jnp.asarray(ref, jnp.float32))
  assert y.shape == ref.shape
  assert np.all(np.isfinite(y))
  scale = max(float(np.abs(ref).max()), 1e-30)
  t = _tol(dtype)
  np.testing.assert_allclose(y, ref, rtol=t, atol=t * scale)


def _make(rng, e, n, k, sizes, m, dtype, *, glu, bias=True, rw=False, center=122, spread=2, fast=None):
  blocks, scales = mxfp4.random_packed_np(rng, (e, n, k), scale_center=center, scale_spread=spread)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  b = jnp.asarray(rng.standard_normal((e, n)) * 0.5, dtype) if bias else None
  r = jnp.asarray(rng.uniform(0.1, 1.0, (m,)), jnp.float32) if rw else None
  gs = jnp.asarray(sizes, jnp.int32)
  w = mxfp4_gmm.prepare(blocks, scales, interleaved_glu=glu, assume_normal_scales=fast)
  return blocks, scales, x, b, r, gs, w


# ------------------------------------------------------------------------------------------ decode


def test_decoder_every_code_every_scale_bit_exact():
  code = jnp.arange(16, dtype=jnp.int32)[:, None]
  scale = jnp.arange(255, dtype=jnp.int32)[None, :]
  got = np.asarray(layout.e2m1_bits_i32(code, scale)).view(np.uint32)
  want = np.asarray(mxfp4.e2m1_times_pow2_bits(code, scale))
  np.testing.assert_array_equal(got, want)
  # the in-kernel plane decoder (f32 and the truncating bf16 path)
  words = jnp.asarray(np.arange(16, dtype=np.uint32)[:, None] * 0x11111111, jnp.uint32)
  words = jax.lax.bitcast_convert_type(words, jnp.int32) + jnp.zeros((16, 255), jnp.int32)
  for sb in range(4):
    sw = (scale << (8 * sb)).astype(jnp.int32)
    for j in (2 * sb, 2 * sb + 1):
      f32 = layout.decode_plane(words, sw, j, jnp.float32)
      np.testing.assert_array_equal(np.asarray(f32).view(np.uint32), want)
      bf16 = layout.decode_plane(words, sw, j, jnp.bfloat16)
      np.testing.assert_array_equal(np.asarray(bf16).view(np.uint16), (want >> 16).astype(np.uint16))
      # fast decoder: exact on the scales it is enabled for, [2, 252]
      lo, hi = layout.FAST_SCALE_MIN, layout.FAST_SCALE_MAX + 1
      fast = layout.decode_plane(words, sw, j, jnp.float32, fast=True)
      np.testing.assert_array_equal(np.asarray(fast).view(np.uint32)[:, lo:hi], want[:, lo:hi])
      fast16 = layout.decode_plane(words, sw, j, jnp.bfloat16, fast=True)
      np.testing.assert_array_equal(np.asarray(fast16).view(np.uint16)[:, lo:hi],
                                    (want[:, lo:hi] >> 16).astype(np.uint16))


@pytest.mark.parametrize("glu", [False, True])
def test_prepare_roundtrip_full_scale_range(glu):
  rng = np.random.default_rng(1)
  blocks, scales = mxfp4.random_packed_np(rng, (2, 6, 2880), scale_center=127, scale_spread=127)
  w = mxfp4_gmm.prepare(blocks, scales, interleaved_glu=glu)
  assert w.wq.dtype == jnp.int32 and w.ws.dtype == jnp.int32 and not w.normal_scales
  assert w.wq.shape == (2, 2 if glu else 1, 2944 // 8, 3 if glu else 6)
  assert w.ws.shape == (2, 2 if glu else 1, 2944 // 128, 3 if glu else 6)
  for dt, view in ((jnp.float32, np.uint32), (jnp.bfloat16, np.uint16)):
    ref = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), dt)).reshape(2, 6, 2880)
    got = np.asarray(mxfp4_gmm.dequantize_prepared(w, dt))
    parts = [ref[:, 0::2], ref[:, 1::2]] if glu else [ref]
    for s, p in enumerate(parts):
      np.testing.assert_array_equal(got[:, s].view(view), p.view(view))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_every_code_many_scales_exact(impl, dtype):
  """One-hot rows of x read W^T back exactly: every byte value (all code pairs) at scales 96..158."""
  k, n = 512, 128
  codes = np.arange(256, dtype=np.uint8)
  blocks = np.stack([np.roll(codes, 7 * r) for r in range(n)]).reshape(1, n, k // 32, 16)
  scales = (96 + (np.arange(n)[:, None] * 3 + np.arange(k // 32)[None, :] * 5) % 63).astype(np.uint8)[None]
  w = mxfp4_gmm.prepare(blocks, scales)
  assert w.normal_scales  # the fast decoder
  m = 300  # > 256: the prefill tiling; rows 300.. beyond K are not needed
  x = jnp.asarray(np.eye(m, k), dtype)
  y = mxfp4_gmm.gmm(x, w, jnp.array([m], jnp.int32), impl=impl)
  want = np.asarray(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), dtype))[0].reshape(n, k).T[:m]
  np.testing.assert_array_equal(np.asarray(jnp.asarray(y, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32)))


# --------------------------------------------------------------------------------------- numerics

CASES = {
    # name: (E, N_ckpt, K, group_sizes, M, dtypes)
    "single_group": (1, 128, 64, [5], 5, ("float32",)),
    "empty_groups_and_padding": (4, 96, 96, [0, 7, 0, 12], 24, ("bfloat16",)),
    "straddling_tiles": (3, 64, 160, [17, 1, 30], 48, ("float32",)),
    "m1": (4, 64, 64, [0, 0, 1, 0], 1, ("bfloat16",)),
    "k2880": (2, 64, 2880, [3, 0], 8, ("float32", "bfloat16")),
}
GRID = [(c, d) for c, spec in CASES.items() for d in spec[-1]]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("epilogue", [None, "swiglu"])
@pytest.mark.parametrize("case,dtype", GRID)
def test_gmm_matches_reference(case, dtype, epilogue, impl):
  e, n, k, sizes, m, _ = CASES[case]
  dtype = jnp.dtype(dtype)
  glu = epilogue == "swiglu"
  rng = np.random.default_rng(sum(map(ord, case + str(epilogue))))
  exact = case in ("straddling_tiles", "m1")  # the general decoder; the others take the fast one
  blocks, scales, x, b, r, gs, w = _make(rng, e, n, k, sizes, m, dtype, glu=glu, rw=not glu,
                                         fast=False if exact else None)
  assert w.normal_scales == (not exact)
  kw = dict(bias=b, epilogue=epilogue, swiglu_alpha=ALPHA, swiglu_limit=LIMIT, row_weights=r)
  y = mxfp4_gmm.gmm(x, w, gs, impl=impl, **kw)
  ref = mxfp4_gmm.gmm_reference(x, blocks, scales, gs, **kw)
  assert y.dtype == dtype and y.shape == (m, n // 2 if glu else n)
  _assert_close(y, ref, dtype)
  total = int(np.sum(sizes))
  assert np.all(np.asarray(y[total:], np.float32) == 0), "padding rows must be zero"


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("epilogue", [None, "swiglu"])
def test_gmm_large_m(epilogue, impl):
  """M > 4096 over several groups (small N to stay fast): exercises the prefill tilings."""
  glu = epilogue == "swiglu"
  sizes, m = [1500, 0, 2117, 500], 4160
  rng = np.random.default_rng(7)
  blocks, scales, x, b, r, gs, w = _make(rng, 4, 64, 64, sizes, m, jnp.bfloat16, glu=glu, rw=True)
  kw = dict(bias=b, epilogue=epilogue, swiglu_alpha=ALPHA, swiglu_limit=LIMIT, row_weights=r)
  y = mxfp4_gmm.gmm(x, w, gs, impl=impl, **kw)
  _assert_close(y, mxfp4_gmm.gmm_reference(x, blocks, scales, gs, **kw), jnp.bfloat16)


def test_swiglu_clamps_and_out_dtype():
  """Large weights push pre-activations past +-limit: exercises both clamps; f32 out from bf16 in."""
  rng = np.random.default_rng(3)
  blocks, scales, x, b, r, gs, w = _make(rng, 2, 64, 64, [4, 4], 8, jnp.bfloat16, glu=True, center=127)
  kw = dict(bias=b, epilogue="swiglu", swiglu_alpha=ALPHA, swiglu_limit=LIMIT, out_dtype=jnp.float32)
  ref = mxfp4_gmm.gmm_reference(x, blocks, scales, gs, **kw)
  pre = mxfp4_gmm.gmm_reference(x, blocks, scales, gs, bias=b, out_dtype=jnp.float32)
  assert float(jnp.max(pre)) > LIMIT and float(jnp.min(pre)) < -LIMIT
  y = mxfp4_gmm.gmm(x, w, gs, impl="mosaic_interpret", **kw)
  assert y.dtype == jnp.float32
  _assert_close(y, ref, jnp.bfloat16)


def test_bias_layouts_and_reference_impl():
  rng = np.random.default_rng(4)
  blocks, scales, x, b, r, gs, w = _make(rng, 3, 64, 64, [2, 3, 1], 6, jnp.float32, glu=True)
  kw = dict(epilogue="swiglu", swiglu_alpha=ALPHA, swiglu_limit=LIMIT)
  y1 = mxfp4_gmm.gmm(x, w, gs, bias=b, impl="reference", **kw)
  y2 = mxfp4_gmm.gmm(x, w, gs, bias=mxfp4_gmm.prepare_bias(b, interleaved_glu=True), impl="mosaic_interpret", **kw)
  _assert_close(y1, mxfp4_gmm.gmm_reference(x, blocks, scales, gs, bias=b, **kw), jnp.float32)
  _assert_close(y2, y1, jnp.float32)
  with pytest.raises(ValueError, match="interleaved_glu"):
    mxfp4_gmm.gmm(x, w, gs, impl="mosaic_interpret")  # swiglu weights need the swiglu epilogue


# ------------------------------------------------------------------------------- impl vocabulary


def test_impl_vocabulary():
  assert mxfp4_gmm.CPU_DEFAULT_IMPL is Impl.MOSAIC_INTERPRET
  assert mxfp4_gmm.resolve_impl("auto") is Impl.MOSAIC_INTERPRET  # CPU
  assert mxfp4_gmm.resolve_impl(Impl.TRITON_INTERPRET) is Impl.TRITON_INTERPRET
  assert mxfp4_gmm.resolve_impl("mosaic") is Impl.MOSAIC and Impl.MOSAIC == "mosaic"
  assert Impl.TRITON_INTERPRET.body is Impl.TRITON and Impl.TRITON_INTERPRET.interpret
  assert Impl.MOSAIC.body == "mosaic" and not Impl.MOSAIC.interpret
  assert Impl.REFERENCE.body == "reference" and not Impl.REFERENCE.interpret
  assert set(mxfp4_gmm.IMPLS) == {m.value for m in Impl}
  rng = np.random.default_rng(4)
  _, _, x, _, _, gs, w = _make(rng, 2, 64, 64, [2, 3], 5, jnp.float32, glu=False, bias=False)
  for old, new in (("interpret", "mosaic_interpret"), ("interpret-triton", "triton_interpret"),
                   ("interpret_mosaic", "mosaic_interpret")):
    with pytest.raises(ValueError, match=f"renamed.*{new}"):
      mxfp4_gmm.gmm(x, w, gs, impl=old)
  with pytest.raises(ValueError, match="triton_interpret"):
    mxfp4_gmm.gmm(x, w, gs, impl="cuda")
  # a string and the enum member are the same static configuration (one trace, same result)
  np.testing.assert_array_equal(np.asarray(mxfp4_gmm.gmm(x, w, gs, impl="mosaic_interpret")),
                                np.asarray(mxfp4_gmm.gmm(x, w, gs, impl=Impl.MOSAIC_INTERPRET)))


# --------------------------------------------------------------------------------- cost estimate


def test_cost_estimate_hand_computed():
  """gpt-oss-20b decode (4 rows, 32 experts, down projection): only the 4 experts that can be hit
  count; prefill (16384 rows) reads all 32; x is read once per column tile."""
  k = n = 2880
  kp = 2944
  w_all = 32 * 1 * (kp // 8 + kp // 128) * n * 4  # int32 words + scale words of all experts
  ce = common.gmm_cost_estimate(m=4, k=k, n=n, splits=1, num_experts=32, x_bytes=16 * k * 2,
                                weight_bytes=w_all, out_bytes=16 * n * 2, x_reads=6,
                                bias_bytes=32 * n * 2, other_bytes=100)
  per_expert = (kp // 8 + kp // 128) * n * 4 + n * 2
  assert ce.flops == 2 * 4 * k * n and ce.transcendentals == 0
  assert ce.bytes_accessed == 6 * 16 * k * 2 + 4 * per_expert + 16 * n * 2 + 100
  ce = common.gmm_cost_estimate(m=16384, k=k, n=n, splits=2, num_experts=32, x_bytes=16384 * k * 2,
                                weight_bytes=2 * w_all, out_bytes=16384 * n * 2, epilogue="swiglu")
  assert ce.flops == 2 * 16384 * k * n * 2 and ce.transcendentals == 16384 * n
  assert ce.bytes_accessed == 16384 * k * 2 + 2 * w_all + 16384 * n * 2


@pytest.mark.parametrize("impl", ["triton", "mosaic", "triton_interpret", "mosaic_interpret"])
@pytest.mark.parametrize("epilogue", [None, "swiglu"])
def test_cost_estimate_attached(impl, epilogue):
  """Every pallas_call carries its estimate (traced only: works for the non-interpreted kernels
  on CPU too); flops = 2 M K N per split, bytes cover x, the touched experts' packed weights and y."""
  glu = epilogue == "swiglu"
  e, n, k, m = 8, 256, 320, 5
  rng = np.random.default_rng(2)
  _, _, x, b, r, gs, w = _make(rng, e, n, k, [2, 0, 3, 0, 0, 0, 0, 0], m, jnp.bfloat16, glu=glu,
                               rw=not glu)
  kw = dict(bias=b, epilogue=epilogue, swiglu_alpha=ALPHA, swiglu_limit=LIMIT, row_weights=r)
  calls = cost.traced_cost_estimates(lambda x: mxfp4_gmm.gmm(x, w, gs, impl=impl, **kw), x)
  assert len(calls) == 1
  name, ce = calls[0]
  assert name == ("mxfp4_gmm_triton" if Impl(impl).body is Impl.TRITON else "mxfp4_gmm_tpu")
  assert ce is not None
  splits, n_out = (2, n // 2) if glu else (1, n)
  assert ce.flops == 2 * m * k * n_out * splits
  assert ce.transcendentals == (m * n_out if glu else 0)
  kp = 384
  touched_w = min(e, m) * splits * (kp // 8 + kp // 128) * n_out * 4
  lo = m * k * 2 + touched_w + m * n_out * 2
  assert lo <= ce.bytes_accessed <= 4 * lo + cost.nbytes(w.wq, w.ws)


@pytest.mark.aot
def test_cost_estimate_in_mosaic_lowering():
  """The estimate is serialised into the Mosaic custom call's backend_config (TPU lowering)."""
  if not aot.toolchain_available("v5e"):
    pytest.skip("libtpu (the `aot` extra) is not installed")
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0])
  e, n, k, m = 4, 256, 256, 40
  rng = np.random.default_rng(3)
  _, _, _, _, _, gs, w = _make(rng, e, n, k, [10, 10, 10, 10], m, jnp.bfloat16, glu=False, bias=False)
  sd = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  f = jax.jit(lambda x, wq, ws, gs: mxfp4_gmm.gmm(
      x, layout.MXFP4GmmWeights(wq, ws, k, n, normal_scales=True), gs, impl="mosaic"))
  txt = f.lower(jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=sh), sd(w.wq), sd(w.ws), sd(gs)).as_text()
  (ce,) = cost.mosaic_cost_estimates(txt)
  assert ce["flops"] == 2 * m * k * n
  assert ce["bytes_accessed"] >= cost.nbytes(w.wq, w.ws) + m * (k + n) * 2


# -------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("epilogue", [None, "swiglu"])
def test_gradients_match_reference(epilogue):
  glu = epilogue == "swiglu"
  rng = np.random.default_rng(5)
  blocks, scales, x, b, r, gs, w = _make(rng, 3, 64, 96, [5, 0, 9], 16, jnp.float32, glu=glu, rw=True)
  ct = jnp.asarray(rng.standard_normal((16, 32 if glu else 64)), jnp.float32)
  kw = dict(epilogue=epilogue, swiglu_alpha=ALPHA, swiglu_limit=LIMIT)

  def loss_k(x, b, r):
    return jnp.sum(mxfp4_gmm.gmm(x, w, gs, bias=b, row_weights=r, impl="mosaic_interpret", **kw) * ct)

  def loss_r(x, b, r):
    return jnp.sum(mxfp4_gmm.gmm_reference(x, blocks, scales, gs, bias=b, row_weights=r, **kw) * ct)

  gk = jax.grad(loss_k, argnums=(0, 1, 2))(x, b, r)
  gr = jax.grad(loss_r, argnums=(0, 1, 2))(x, b, r)
  for a, c in zip(gk, gr):
    _assert_close(a, c, jnp.float32)
  assert float(jnp.abs(gk[0][14:]).max()) == 0.0  # padding rows get no gradient
  if not glu:
    return
  # bf16 compute: grads w.r.t. x through jit as well
  xb = x.astype(jnp.bfloat16)
  gkb = jax.jit(jax.grad(lambda x: loss_k(x, b, r)))(xb)
  grb = jax.grad(lambda x: loss_r(x, b, r))(xb)
  _assert_close(gkb, grb, jnp.bfloat16)


# ---------------------------------------------------------------------------- AOT compile tier

AOT_TPU_CASES = [  # (target, experts, M, proj, dtype, exact decoder): decode 1/8/64 tokens x top-4,
    # prefill 4096 tokens x top-4
    ("v5e", 32, 4, "gate_up", "bfloat16", False), ("v5e", 128, 32, "down", "bfloat16", False),
    ("v5e", 32, 16384, "gate_up", "bfloat16", False), ("v5e", 32, 32, "gate_up", "float32", False),
    ("v6e", 128, 4, "down", "bfloat16", False), ("v6e", 32, 256, "gate_up", "bfloat16", False),
    ("v6e", 128, 16384, "down", "bfloat16", False), ("v6e", 32, 16384, "gate_up", "bfloat16", True),
    ("tpu7x", 32, 32, "gate_up", "bfloat16", False), ("tpu7x", 128, 16384, "gate_up", "bfloat16", False),
    ("v6e", 32, 2048, "down", "bfloat16", False),
]
AOT_H100_CASES = [
    ("h100", 32, 4, "gate_up", "bfloat16", False), ("h100", 128, 32, "down", "bfloat16", False),
    ("h100", 128, 256, "gate_up", "bfloat16", False), ("h100", 32, 16384, "gate_up", "bfloat16", False),
    ("h100", 128, 16384, "down", "bfloat16", False), ("h100", 32, 16384, "gate_up", "bfloat16", True),
    ("h100", 32, 2048, "gate_up", "bfloat16", False),
]
# Ampere / Ada (mma.sync bf16 from sm_80): decode and prefill of 20b. The H100 tilings spill a few
# bytes there (sm_80 / sm_89: up to 8 bytes at 96-255 registers; none on H100).
AOT_PRE_HOPPER_CASES = [
    ("a100-40g", 32, 16384, "gate_up", "bfloat16", False), ("l4", 32, 8, "gate_up", "bfloat16", False),
]
PRE_HOPPER_SPILL_BYTES = 16
AOT_ARGS = "target,experts,m,proj,dtype,exact"


@pytest.mark.aot
@pytest.mark.parametrize(AOT_ARGS, AOT_TPU_CASES)
def test_aot_tpu_compile(target, experts, m, proj, dtype, exact):
  if not aot.toolchain_available(target):
    pytest.skip("libtpu (the `aot` extra) is not installed")
  res = aot.run_subprocess(target, experts, m, proj, dtype, exact_decode=exact)
  assert res["mosaic_custom_call"]
  # the pl.CostEstimate reaches the Mosaic custom call (XLA's scheduler reads it from there)
  _, wqs, wss, _, k, n, s = aot.case_shapes(experts, m, proj)
  (ce,) = res["cost_estimates"]
  assert ce["flops"] == 2 * m * k * n * s, res
  assert ce["bytes_accessed"] >= min(experts, m) * s * (wqs[2] + wss[2]) * n * 4, res
  assert res["vmem_bytes"] <= res["vmem_limit_bytes"] <= res["vmem_physical_bytes"]
  # no relayout copy of the weights / padded copy of x: temporaries stay far below one weight array
  assert res["hbm_temp_bytes"] < 8 << 20, res


@pytest.mark.aot
@pytest.mark.parametrize(AOT_ARGS, AOT_H100_CASES + AOT_PRE_HOPPER_CASES)
def test_aot_gpu_compile_ptx(target, experts, m, proj, dtype, exact):
  """The Triton kernel compiles for the GPU to bf16 MMA (never tf32) and assembles with ptxas for its
  arch (sm_90a, sm_80, sm_89): registers, spills, no relayout temporaries."""
  if not aot.toolchain_available(target):
    pytest.skip("jax-cuda12-plugin / nvcc (the `aot` extra) missing")
  res = aot.run_subprocess(target, experts, m, proj, dtype, exact_decode=exact)
  spill_limit = 0 if target == "h100" else PRE_HOPPER_SPILL_BYTES
  assert res["ptx_found"] and res["ptxas_rc"] == 0, res
  assert res["spill_store_bytes"] <= spill_limit and res["spill_load_bytes"] <= spill_limit, res
  assert res["registers"] <= 255, res
  assert any("bf16" in i for i in res["mma_instructions"]), res
  assert not res["tf32_mma"], res
  assert res["hbm_temp_bytes"] < 8 << 20, res


@pytest.mark.aot
def test_aot_h100_f32_no_tf32():
  """f32 compute: IEEE f32 FMAs, no tf32 MMA."""
  if not aot.toolchain_available("h100"):
    pytest.skip("jax-cuda12-plugin / nvcc (the `aot` extra) or the H100 target config missing")
  res = aot.run_subprocess("h100", 32, 8, "down", dtype="float32")
  assert res["ptx_found"] and res["ptxas_rc"] == 0 and res["spill_store_bytes"] == 0, res
  assert not res["tf32_mma"] and not res["mma_instructions"], res
