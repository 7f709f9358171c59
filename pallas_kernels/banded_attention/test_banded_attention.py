"""Tests for pallas_kernels.banded_attention.

* interpret-mode numerics of both kernel bodies (impl="triton_interpret", "mosaic_interpret")
  against the pure-jnp reference, which is itself checked once against transformers'
  eager_attention_forward + eager_mask;
* the shared impl vocabulary (pallas_kernels.impl) and the pl.CostEstimate of every pallas_call
  (hand-computed band sizes; serialised into the Mosaic custom call);
* decode against the prefill reference on the full sequence (ring buffer wrapping, ragged rows);
* gradients (q, k, v, sinks) against jax.grad of the reference;
* @pytest.mark.aot: real deviceless compiles at gpt-oss shapes for TPU v5e / v6e / tpu7x and H100,
  with ptxas register / spill / MMA checks of the Triton kernels.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess

import numpy as np
import pytest

# Deviceless compiles (CUDA topology) need the CPU platform; same default as tests/conftest.py.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from pallas_kernels import banded_attention, cost, gpu_targets
from pallas_kernels.banded_attention import attention, decode_attention
from pallas_kernels.banded_attention import common as common_mod
from pallas_kernels.banded_attention import reference as ref_mod
from pallas_kernels.impl import Impl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(B, T, S, N, K, H, *, dtype=jnp.float32, sink="normal", seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
  sinks = {
      "normal": jax.random.normal(ks[3], (N,)) * 2.0,
      "large_pos": jnp.full((N,), 30.0) + jax.random.normal(ks[3], (N,)),
      "large_neg": jnp.full((N,), -30.0) + jax.random.normal(ks[3], (N,)),
      "neginf": jnp.full((N,), -jnp.inf),
      "mixed": jnp.where(jnp.arange(N) % 2 == 0, -jnp.inf, jax.random.normal(ks[3], (N,)) * 3),
  }[sink].astype(jnp.float32)
  return q, k, v, sinks


def _close(a, b, atol=2e-5, rtol=2e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                             rtol=rtol)


# ---------------------------------------------------------------------------------------------
# reference vs transformers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_transformers_eager(window):
  torch = pytest.importorskip("torch")
  from transformers.masking_utils import (causal_mask_function, eager_mask,
                                          sliding_window_causal_mask_function)
  from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

  B, T, N, K, H = 2, 19, 8, 2, 16
  q, k, v, sinks = _inputs(B, T, T, N, K, H, sink="normal", seed=3)
  fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
  mask = eager_mask(batch_size=B, q_length=T, kv_length=T, mask_function=fn,
                    dtype=torch.float32)

  class _M(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.num_key_value_groups = N // K
      self.sinks = torch.nn.Parameter(torch.tensor(np.asarray(sinks)))

  m = _M().eval()
  t = lambda x: torch.tensor(np.asarray(x)).transpose(1, 2)  # [B,heads,T,H]
  out_t, _ = eager_attention_forward(m, t(q), t(k), t(v), mask, scaling=H ** -0.5)
  out_r = ref_mod.attention_reference(q, k, v, sinks, window=window)
  _close(out_r, out_t.detach().numpy(), atol=1e-5, rtol=1e-5)
  # the window is exact: W keys including self (a W+1 window must differ)
  if window is not None:
    wider = ref_mod.attention_reference(q, k, v, sinks, window=window + 1)
    assert float(jnp.max(jnp.abs(wider - out_r))) > 1e-3


# ---------------------------------------------------------------------------------------------
# prefill numerics (interpret mode)
# ---------------------------------------------------------------------------------------------
# (T, S, window, G, sink, q_offset, kv_len)
PREFILL_CASES = [
    (1, 1, None, 8, "normal", None, None),
    (127, 127, 128, 4, "large_pos", None, None),
    (128, 128, 1, 1, "large_neg", None, None),
    (129, 129, 128, 8, "neginf", None, None),
    (300, 300, 128, 8, "mixed", None, [300, 211]),
    (300, 300, 1000, 1, "neginf", None, None),
    (1000, 1000, 128, 8, "normal", None, None),
    (1000, 1000, None, 4, "large_neg", None, [1000, 517]),
    (129, 400, 128, 4, "normal", [271, 100], [400, 229]),  # chunked prefill / cache continuation
    (129, 400, None, 8, "neginf", [271, 0], [400, 90]),  # row 1: queries past kv_len; no sink
]


def _ids(c):
  return f"T{c[0]}-S{c[1]}-W{c[2]}-G{c[3]}-{c[4]}" + ("-off" if c[5] else "") + \
      ("-kvlen" if c[6] else "")


def _run_prefill(case, impl, dtype=jnp.float32):
  T, S, window, G, sink, q_offset, kv_len = case
  K, H, B = 2, 32, 2
  q, k, v, sinks = _inputs(B, T, S, G * K, K, H, sink=sink, dtype=dtype, seed=T + G)
  kw = dict(window=window)
  if q_offset is not None:
    kw["q_offset"] = jnp.array(q_offset, jnp.int32)
  if kv_len is not None:
    kw["kv_len"] = jnp.array(kv_len, jnp.int32)
    # keys past kv_len are garbage (NaN) and must never leak into the output
    dead = jnp.arange(S)[None, :, None, None] >= kw["kv_len"][:, None, None, None]
    k = jnp.where(dead, jnp.nan, k).astype(dtype)
    v = jnp.where(dead, jnp.nan, v).astype(dtype)
  out = attention(q, k, v, sinks, impl=impl, **kw)
  ref = ref_mod.attention_reference(q, k, v, sinks, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  return out, ref


@pytest.mark.parametrize("case", PREFILL_CASES, ids=_ids)
def test_prefill_triton_interpret(case):
  out, ref = _run_prefill(case, "triton_interpret")
  _close(out, ref)
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("case", [PREFILL_CASES[i] for i in (0, 2, 4, 6, 8, 9)], ids=_ids)
def test_prefill_mosaic_interpret(case):
  out, ref = _run_prefill(case, "mosaic_interpret")
  _close(out, ref)
  assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("impl", ["triton_interpret", "mosaic_interpret"])
def test_prefill_bf16(impl):
  out, ref = _run_prefill((300, 300, 128, 8, "normal", None, None), impl, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  _close(out, ref, atol=3e-2, rtol=3e-2)


def test_large_sink_suppresses_attention():
  q, k, v, _ = _inputs(1, 64, 64, 8, 2, 32)
  out = attention(q, k, v, jnp.full((8,), 80.0), window=16, impl="triton_interpret")
  assert float(jnp.max(jnp.abs(out))) < 1e-20


# ---------------------------------------------------------------------------------------------
# decode (ring buffer / contiguous cache) vs prefill reference on the full sequence
# ---------------------------------------------------------------------------------------------
def _decode_case(B, S_cache, window, T, cache_len, G=4, K=2, H=32, dtype=jnp.float32,
                 sink="normal"):
  L = max(cache_len) + T
  q, k, v, sinks = _inputs(B, L, L, G * K, K, H, dtype=dtype, sink=sink, seed=S_cache + T)
  k_cache = np.zeros((B, S_cache, K, H), np.float32)
  v_cache = np.zeros((B, S_cache, K, H), np.float32)
  # fill the unused slots with garbage that must never be read
  k_cache[:] = 1e4
  v_cache[:] = np.nan
  qs, kn, vn = [], [], []
  for b, c in enumerate(cache_len):
    for p in range(c):  # the generation code's write rule: slot p (contiguous) or p % W (ring)
      k_cache[b, p % S_cache] = np.asarray(k[b, p], np.float32)
      v_cache[b, p % S_cache] = np.asarray(v[b, p], np.float32)
    qs.append(q[b, c:c + T]), kn.append(k[b, c:c + T]), vn.append(v[b, c:c + T])
  qs, kn, vn = (jnp.stack(x) for x in (qs, kn, vn))
  full = ref_mod.attention_reference(q, k, v, sinks, window=window)
  expect = jnp.stack([full[b, c:c + T] for b, c in enumerate(cache_len)])
  args = (qs, kn, vn, jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype), sinks,
          jnp.array(cache_len, jnp.int32))
  return args, expect


# (S_cache, window, T, cache_len per row)
DECODE_CASES = [
    (16, 16, 1, [5, 16, 40]),  # ring: partially filled, exactly full, wrapped
    (16, 16, 3, [0, 17, 53]),  # ring, 3 new tokens, empty row
    (16, 16, 20, [7, 33, 16]),  # ring, chunked prefill with T > W
    (96, None, 1, [0, 17, 95]),  # contiguous full attention
    (96, None, 4, [1, 60, 92]),
    (96, 16, 2, [3, 40, 94]),  # contiguous cache used by a sliding layer
]


# the Mosaic kernel runs all cases but the T=3 ring one (same code path as T=1 / T=20; CI time)
@pytest.mark.parametrize("case,impl", [
    (c, impl) for c in DECODE_CASES for impl in ("triton_interpret", "mosaic_interpret", "reference")
    if not (impl == "mosaic_interpret" and c[2] == 3)],
    ids=lambda x: f"Sc{x[0]}-W{x[1]}-T{x[2]}" if isinstance(x, tuple) else x)
def test_decode(case, impl):
  S_cache, window, T, cache_len = case
  args, expect = _decode_case(3, S_cache, window, T, cache_len)
  out = decode_attention(*args, window=window, impl=impl)
  assert out.shape == expect.shape
  _close(out, expect)


def test_decode_chunk_several_q_blocks():
  # T*G = 160 query rows > 128: the Triton decode kernel tiles the new tokens over a q grid axis
  args, expect = _decode_case(2, 16, 16, 20, [9, 45], G=8)
  _close(decode_attention(*args, window=16, impl="triton_interpret"), expect)


@pytest.mark.parametrize("window,S_cache", [(16, 16), (None, 96)])
def test_decode_chunk_several_q_blocks_mosaic(window, S_cache):
  # T*G = 280 query rows > DECODE_BLOCK_ROWS = 256: the Mosaic decode kernel tiles the new tokens
  # over a q grid axis (2 blocks of 32 tokens, the last one padded), each with its own positions
  from pallas_kernels.banded_attention import tpu as tpu_kernels
  assert 35 * 8 > tpu_kernels.DECODE_BLOCK_ROWS
  args, expect = _decode_case(2, S_cache, window, 35, [9, 45], G=8, K=1, H=16)
  _close(decode_attention(*args, window=window, impl="mosaic_interpret"), expect)


@pytest.mark.parametrize("impl", ["triton_interpret", "mosaic_interpret"])
def test_decode_bf16_gqa8_neginf_sink(impl):
  args, expect = _decode_case(2, 32, 32, 1, [10, 75], G=8, dtype=jnp.bfloat16, sink="mixed")
  out = decode_attention(*args, window=32, impl=impl)
  assert out.dtype == jnp.bfloat16
  _close(out, expect, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,sink,G,impl", [(16, "normal", 4, "triton_interpret"),
                                                 (None, "mixed", 8, "triton_interpret"),
                                                 (1, "large_pos", 1, "triton_interpret"),
                                                 (16, "normal", 8, "mosaic_interpret")])
def test_gradients(window, sink, G, impl):
  B, T, S, K, H = 2, 100, 128, 2, 16
  q, k, v, sinks = _inputs(B, T, S, G * K, K, H, sink=sink, seed=7)
  q_offset = jnp.array([31, 0], jnp.int32)
  kv_len = jnp.array([128, 80], jnp.int32)
  w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

  def loss(fn):
    return lambda q, k, v, s: jnp.sum(fn(q, k, v, s) * w)

  kern = loss(lambda q, k, v, s: attention(q, k, v, s, window=window, q_offset=q_offset,
                                           kv_len=kv_len, impl=impl))
  refl = loss(lambda q, k, v, s: ref_mod.attention_reference(
      q, k, v, s, window=window, q_offset=q_offset, kv_len=kv_len))
  g1 = jax.grad(kern, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  g2 = jax.grad(refl, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for a, b, name in zip(g1, g2, "q k v sinks".split()):
    assert bool(jnp.all(jnp.isfinite(a))), name
    _close(a, b, atol=1e-4, rtol=1e-4)
  if sink == "normal":
    assert float(jnp.max(jnp.abs(g1[3]))) > 1e-6  # the sink gradient is not trivially zero


# ---------------------------------------------------------------------------------------------
# impl vocabulary and cost estimates
# ---------------------------------------------------------------------------------------------
def test_impl_vocabulary():
  assert banded_attention.CPU_DEFAULT_IMPL is Impl.TRITON_INTERPRET
  assert banded_attention.resolve_impl("auto") is Impl.TRITON_INTERPRET  # CPU
  assert banded_attention.resolve_impl("mosaic_interpret") is Impl.MOSAIC_INTERPRET
  q, k, v, sinks = _inputs(1, 8, 8, 4, 2, 16)
  for old, new in (("interpret", "triton_interpret"), ("interpret_mosaic", "mosaic_interpret"),
                   ("interpret-triton", "triton_interpret")):
    with pytest.raises(ValueError, match=f"renamed.*{new}"):
      attention(q, k, v, sinks, impl=old)
  with pytest.raises(ValueError, match="mosaic_interpret"):
    decode_attention(q[:, :1], k[:, :1], v[:, :1], k, v, sinks, jnp.array([3]), impl="gpu")
  # string and enum member: the same static configuration
  _close(attention(q, k, v, sinks, window=3, impl=Impl.MOSAIC_INTERPRET),
         attention(q, k, v, sinks, window=3, impl="mosaic_interpret"), atol=0, rtol=0)


def _brute_pairs(T, S, window, qoff):
  vis = common_mod._visibility(1, T, S, jnp.array([qoff]), jnp.array([S]), window)
  return int(jnp.sum(vis))


@pytest.mark.parametrize("T,S,window", [(1, 1, None), (16, 16, 4), (100, 100, None), (37, 100, 8),
                                        (37, 100, None), (5, 300, 128), (64, 64, 1)])
def test_band_sizes_vs_brute_force(T, S, window):
  assert common_mod.prefill_pairs(T, S, window) == _brute_pairs(T, S, window, max(S - T, 0))
  vis = common_mod._visibility(1, T, S, jnp.array([max(S - T, 0)]), jnp.array([S]), window)
  keys = int(jnp.sum(jnp.any(vis[0], axis=0)))
  assert common_mod.prefill_keys_read(T, S, window) == keys
  # decode with a full cache: cached positions c - Sc .. c - 1 (c >= Sc), new token t at c + t
  for Sc in (S, 2 * S):
    c = 3 * Sc
    pos = np.arange(c - Sc, c)
    want = sum(int(np.sum(pos > c + t - window)) if window else Sc for t in range(T))
    assert common_mod.decode_pairs(T, Sc, window) == want


def _grad_and_decode_fns(impl, window):
  def grad(q, k, v, s):
    return jax.grad(lambda *a: jnp.sum(attention(*a, window=window, impl=impl)),
                    argnums=(0, 1, 2, 3))(q, k, v, s)

  def decode(q, kn, kc, s, cl):
    return decode_attention(q, kn, kn, kc, kc, s, cl, window=window, impl=impl)
  return grad, decode


@pytest.mark.parametrize("impl", ["triton", "mosaic", "triton_interpret", "mosaic_interpret"])
@pytest.mark.parametrize("window", [None, 16])
def test_cost_estimates_attached(impl, window):
  """Prefill forward, dq, dk/dv and decode partials all carry an estimate (tracing only, so the
  non-interpreted kernels are checked on CPU as well): flops = 2 H x (2 | 3 | 4 matmuls) per
  visible (query head, key) pair, one exp per pair, bytes >= q/k/v/out (the band's share)."""
  B, T, N, K, H = 2, 48, 8, 2, 32
  q, k, v, sinks = _inputs(B, T, T, N, K, H, dtype=jnp.bfloat16)
  grad, decode = _grad_and_decode_fns(impl, window)
  calls = dict(cost.traced_cost_estimates(grad, q, k, v, sinks))
  suffix = "_tpu" if Impl(impl).body is Impl.MOSAIC else ""
  names = {f"banded_attention_prefill{suffix}": 2, f"banded_attention_bwd_dq{suffix}": 3,
           f"banded_attention_bwd_dkdv{suffix}": 4}
  assert set(calls) == set(names), calls
  pairs = _brute_pairs(T, T, window, 0)
  qkv = cost.nbytes(q, k, v)
  for name, mm in names.items():
    ce = calls[name]
    assert ce is not None, name
    assert ce.flops == 2 * mm * H * B * N * pairs, name
    assert ce.transcendentals == B * N * pairs, name
    assert qkv + cost.nbytes(q) <= ce.bytes_accessed <= 4 * (qkv + cost.nbytes(q)), name
  # decode: one new token, cache of 64 slots (ring of W = 16 when sliding)
  Sc = 64 if window is None else window
  kc = jnp.zeros((B, Sc, K, H), jnp.bfloat16)
  (name, ce), = cost.traced_cost_estimates(decode, q[:, :1], k[:, :1], kc, sinks,
                                           jnp.array([70, 3], jnp.int32))
  assert name == f"banded_attention_decode{suffix}" and ce is not None
  per_q = Sc if window is None else window - 1
  assert ce.flops == 2 * 2 * H * B * N * per_q and ce.transcendentals == B * N * per_q
  assert 2 * cost.nbytes(kc) <= ce.bytes_accessed <= 2 * cost.nbytes(kc) + 64 * cost.nbytes(q[:, :1])


@pytest.mark.aot
def test_cost_estimates_in_mosaic_lowering():
  """The estimates reach the Mosaic custom calls' backend_config (what XLA's TPU scheduler reads)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu (extra 'aot') not installed")
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0])
  B, T, N, K, H = 1, 256, 8, 2, 64
  sd = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  grad, decode = _grad_and_decode_fns("mosaic", 128)
  txt = jax.jit(grad).lower(sd((B, T, N, H)), sd((B, T, K, H)), sd((B, T, K, H)),
                            sd((N,), jnp.float32)).as_text()
  pairs = common_mod.prefill_pairs(T, T, 128)
  got = sorted(c["flops"] for c in cost.mosaic_cost_estimates(txt))
  assert got == [2 * mm * H * B * N * pairs for mm in (2, 3, 4)], got
  txt = jax.jit(decode).lower(sd((B, 1, N, H)), sd((B, 1, K, H)), sd((B, 128, K, H)),
                              sd((N,), jnp.float32), sd((B,), jnp.int32)).as_text()
  (ce,) = cost.mosaic_cost_estimates(txt)
  assert ce["flops"] == 2 * 2 * H * B * N * 127 and ce["transcendentals"] == B * N * 127


# ---------------------------------------------------------------------------------------------
# AOT: deviceless compiles at gpt-oss shapes
# ---------------------------------------------------------------------------------------------
N_Q, N_KV, HD = 64, 8, 64
# The Ampere / Ada GPUs compile the cases that cover every kernel (prefill, dk/dv, dq, decode);
# the H100 compiles them all.
PRE_HOPPER_CASES = ("prefill_T4096_W128_grad", "decode_S8192_WNone")


def _aot_cases(impl):
  """(name, fn, [(shape, dtype)]) at gpt-oss shapes: 64 q heads, 8 kv heads, head dim 64."""
  bf = jnp.bfloat16
  pre = [((1, 4096, N_Q, HD), bf), ((1, 4096, N_KV, HD), bf), ((1, 4096, N_KV, HD), bf),
         ((N_Q,), jnp.float32)]
  cases = [
      ("prefill_T4096_W128",
       lambda q, k, v, s: attention(q, k, v, s, window=128, impl=impl), pre),
      ("prefill_T4096_full", lambda q, k, v, s: attention(q, k, v, s, impl=impl), pre),
  ]
  for sc, w in [(8192, None), (32768, None), (131072, None), (128, 128)]:
    fn = (lambda w: lambda q, kn, vn, kc, vc, s, cl: decode_attention(
        q, kn, vn, kc, vc, s, cl, window=w, impl=impl))(w)
    cases.append((f"decode_S{sc}_W{w}", fn,
                  [((1, 1, N_Q, HD), bf), ((1, 1, N_KV, HD), bf), ((1, 1, N_KV, HD), bf),
                   ((1, sc, N_KV, HD), bf), ((1, sc, N_KV, HD), bf), ((N_Q,), jnp.float32),
                   ((1,), jnp.int32)]))
  # a prefill chunk of 512 tokens into an 8k cache (prefill_step): 4096 query rows per kv head
  cases.append(("decode_chunk512_S8192", lambda q, kn, vn, kc, vc, s, cl: decode_attention(
      q, kn, vn, kc, vc, s, cl, impl=impl),
      [((1, 512, N_Q, HD), bf), ((1, 512, N_KV, HD), bf), ((1, 512, N_KV, HD), bf),
       ((1, 8192, N_KV, HD), bf), ((1, 8192, N_KV, HD), bf), ((N_Q,), jnp.float32), ((1,), jnp.int32)]))
  if impl == "triton":  # backward kernels (dk/dv and dq) through the custom_vjp
    def grad_fn(q, k, v, s):
      return jax.grad(lambda *a: jnp.sum(attention(*a, window=128, impl=impl).astype(
          jnp.float32)), argnums=(0, 1, 2, 3))(q, k, v, s)
    cases.append(("prefill_T4096_W128_grad", grad_fn, pre))
    f32 = [((1, 512, N_Q, HD), jnp.float32), ((1, 512, N_KV, HD), jnp.float32),
           ((1, 512, N_KV, HD), jnp.float32), ((N_Q,), jnp.float32)]
    cases.append(("prefill_f32_T512_W128",
                  lambda q, k, v, s: attention(q, k, v, s, window=128, impl=impl), f32))
  return cases


def _compile_all(device, impl, dump_root=None, only=None):
  from jax.sharding import SingleDeviceSharding
  sh = SingleDeviceSharding(device)
  results = {}
  for name, fn, specs in _aot_cases(impl):
    if only is not None and name not in only:
      continue
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in specs]
    opts = None if dump_root is None else {"xla_dump_to": os.path.join(dump_root, name)}
    results[name] = jax.jit(fn).lower(*args).compile(compiler_options=opts)
  return results


@pytest.mark.aot
@pytest.mark.parametrize("topo_name", ["v5e:2x2", "v6e:2x2", "tpu7x:2x2x1"])
def test_aot_tpu(topo_name):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu (extra 'aot') not installed")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topo_name, platform="tpu")
  res = _compile_all(topo.devices[0], "mosaic")
  assert set(res) == {c[0] for c in _aot_cases("mosaic")}
  for name, c in res.items():
    txt = c.as_text()
    assert "banded_attention" in txt, name  # the Mosaic kernel is really in the program
  # Every compile above ran under the generation's default scoped-VMEM limit (Mosaic rejects a
  # kernel that does not fit). On v5e (smallest default limit, 16 MiB) also require headroom:
  # the prefill kernel must fit in 14 MiB (it needs ~12.75 MiB).
  if not topo_name.startswith("v5e"):
    return
  # training path on v5e: jax.grad through the custom_vjp compiles the forward with lse output
  # and the Mosaic dq / dk-dv backward kernels under the default 16 MiB scoped limit
  from jax.sharding import SingleDeviceSharding
  bf = jnp.bfloat16
  shd = SingleDeviceSharding(topo.devices[0])
  pre = [jax.ShapeDtypeStruct(shape, dt, sharding=shd) for shape, dt in
         [((1, 4096, N_Q, HD), bf), ((1, 4096, N_KV, HD), bf), ((1, 4096, N_KV, HD), bf),
          ((N_Q,), jnp.float32)]]
  g = jax.jit(lambda q, k, v, s: jax.grad(lambda *a: jnp.sum(attention(
      *a, window=128, impl="mosaic").astype(jnp.float32)), argnums=(0, 1, 2, 3))(q, k, v, s))
  txt = g.lower(*pre).compile().as_text()
  assert "banded_attention_bwd_dq_tpu" in txt and "banded_attention_bwd_dkdv_tpu" in txt
  from pallas_kernels.banded_attention import tpu as tpu_kernels
  sh = SingleDeviceSharding(topo.devices[0])
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  f = jax.jit(lambda q, k, v, s, o, l: tpu_kernels.prefill_forward(
      q, k, v, s, o, l, window=128, sm_scale=0.125, return_lse=False,
      vmem_limit_bytes=14 << 20)[0])
  f.lower(sd((1, 4096, N_Q, HD), jnp.bfloat16), sd((1, 4096, N_KV, HD), jnp.bfloat16),
          sd((1, 4096, N_KV, HD), jnp.bfloat16), sd((N_Q,), jnp.float32),
          sd((1,), jnp.int32), sd((1,), jnp.int32)).compile()


# target: (PTX target, kernels' spill bytes allowed). On sm_80 / sm_89 the dk/dv backward kernel
# (block_k 64, 4 warps: tuned on H100) needs 255 registers and spills 212 bytes (8 warps: 188);
# everything else, and every kernel on H100, spills nothing.
GPU_PTX = {"h100": ("sm_90a", 0), "a100-40g": ("sm_80", 256), "l4": ("sm_89", 256)}


@pytest.mark.aot
@pytest.mark.parametrize("target", sorted(GPU_PTX))
def test_aot_gpu_ptxas(tmp_path, target):
  """The Triton kernels compile for each GPU (bf16 MMA, never tf32: mma.sync on sm_80 / sm_89; on
  H100 wgmma in prefill and backward, mma.sync in decode) and assemble with ptxas for that arch."""
  if not gpu_targets.cuda_toolchain_available():
    pytest.skip("CUDA plugin / nvcc (extra 'aot') not installed")
  arch, spill_limit = GPU_PTX[target]
  # The CUDA topology needs JAX_PLATFORMS=cpu at jax import time; run the compiles in a fresh
  # interpreter so that this holds whatever the pytest process imported first.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([os.sys.executable, os.path.abspath(__file__), "--gpu-dump", target, str(tmp_path)],
                 env=env, check=True, cwd=REPO, timeout=600)
  seen = {}
  for ptx in glob.glob(str(tmp_path / "*" / "*.ptx")):
    src = open(ptx).read()
    m = re.search(r"\.entry (banded_attention_\w+)\(", src)
    if not m:
      continue
    kname = m.group(1)
    assert f".target {arch}" in src
    assert "tf32" not in src, f"{kname}: tf32 MMA"
    mma = set(gpu_targets.mma_instructions(src))
    if "_f32_" in ptx:  # f32 inputs: no MMA on reduced-precision operands (tf32 asserted above)
      assert not any(".bf16" in x or ".f16" in x for x in mma), (kname, mma)
      kname += "_f32"
    else:
      assert mma and all(".bf16.bf16" in x for x in mma), (kname, mma)
    res = gpu_targets.run_ptxas(ptx, target)
    assert res["ptxas_rc"] == 0, res
    spills = max(res["spill_store_bytes"], res["spill_load_bytes"])
    assert spills <= (spill_limit if kname == "banded_attention_bwd_dkdv" else 0), (kname, res)
    assert res["registers"] <= 255, (kname, res)
    seen[kname] = (res["registers"], spills, sorted(mma))
  print(f"{target} ptxas:", seen)
  assert {"banded_attention_prefill", "banded_attention_decode", "banded_attention_bwd_dkdv",
          "banded_attention_bwd_dq"} <= set(seen), seen


def _gpu_compile(target, dump_root):
  only = None if target == "h100" else PRE_HOPPER_CASES
  _compile_all(gpu_targets.topology_devices(target, 1)[0], "triton", dump_root=dump_root, only=only)


if __name__ == "__main__":
  import sys
  assert sys.argv[1] == "--gpu-dump"
  _gpu_compile(sys.argv[2], sys.argv[3])
