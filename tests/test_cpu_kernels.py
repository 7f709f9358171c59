"""The XLA:CPU decode formulations (gptoss_jax.cpu_kernels) against the XLA references, and their
choice by Runtime on a CPU backend."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import mxfp4
from gptoss_jax import cpu_kernels, native, platforms
from gptoss_jax.generate import generate
from gptoss_jax.layers import experts_xla
from gptoss_jax.model import GptOss
from gptoss_jax.ops import XlaAttention, XlaDense, XlaMoE
from gptoss_jax.runtime import Runtime

from helpers import checkpoint_fixtures, tiny_config
from test_moe import dense_reference, make

def every_code(rows, groups, scale_lo, scale_hi, seed):
    """MXFP4 blocks holding every byte value, scales spread over [scale_lo, scale_hi]."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.resize(np.arange(256, dtype=np.uint8), rows * groups * 16)).reshape(rows, groups, 16)
    scales = rng.integers(scale_lo, scale_hi + 1, size=(rows, groups)).astype(np.uint8)
    return jnp.asarray(blocks), jnp.asarray(scales)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mxfp4_matvec_matches_dequantize_then_dot(dtype):
    blocks, scales = every_code(3 * 40, 4, 100, 140, seed=0)  # 3 rows of [40, 128]
    blocks, scales = blocks.reshape(3, 40, 4, 16), scales.reshape(3, 40, 4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 128)), dtype)
    ours = jax.jit(cpu_kernels.mxfp4_matvec)(x, blocks, scales)
    w = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32), np.float64)
    ref = np.einsum("rnk,rk->rn", w, np.asarray(x.astype(jnp.float32), np.float64))
    assert ours.dtype == jnp.float32 and ours.shape == (3, 40)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_split_is_dequantize_in_split_order(dtype):
    blocks, scales = every_code(64, 3, 2, 252, seed=2)  # every scale whose products stay normal
    ours = cpu_kernels.dequantize_split(blocks, scales, dtype)
    ref = mxfp4.dequantize(blocks, scales, dtype)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(cpu_kernels.split_order(ref)))
    x = jnp.arange(2 * 96, dtype=jnp.float32).reshape(2, 96)  # the permutation pairs the columns up
    w = cpu_kernels.dequantize_split(*every_code(5, 3, 120, 124, seed=3), jnp.float32)
    ref = mxfp4.dequantize(*every_code(5, 3, 120, 124, seed=3), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jnp.einsum("tk,nk->tn", cpu_kernels.split_order(x), w)),
                                  np.asarray(jnp.einsum("tk,nk->tn", x, ref)))


@pytest.mark.parametrize("eq,x_shape,w_shape,in_first,dtype", [
    ("BTD,DNH->BTNH", (1, 1, 128), (128, 6, 8), True, jnp.bfloat16),   # q / k / v
    ("BTD,DNH->BTNH", (2, 1, 128), (128, 6, 8), True, jnp.float32),    # two rows, float32 activations
    ("BTNH,NHD->BTD", (1, 1, 4, 32), (4, 32, 48), True, jnp.bfloat16),  # o: two contracted axes
    ("BTD,VD->BTV", (1, 1, 128), (48, 128), False, jnp.bfloat16),      # lm_head
])
def test_project_matches_einsum(eq, x_shape, w_shape, in_first, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.bfloat16)
    n_in = len(x_shape) - 2
    ours = jax.jit(lambda x, w: cpu_kernels.project(x, w, n_in, in_first=in_first))(x, w)
    ref = jnp.einsum(eq, x.astype(jnp.float32), w.astype(jnp.float32))
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_project_keeps_nan_rows():
    """NaN activations give NaN rows, as the einsum does, the one fully NaN row included."""
    w = jnp.ones((64, 16), jnp.bfloat16)
    x = jnp.ones((2, 64), jnp.bfloat16).at[1, 5].set(jnp.nan)
    y = np.asarray(jax.jit(lambda x, w: cpu_kernels.project(x, w, 1, in_first=True))(x, w))
    assert np.all(y[0] == 64) and np.all(np.isnan(y[1]))
    y = np.asarray(jax.jit(lambda x, w: cpu_kernels.project(x, w, 1, in_first=True))(x[1:], w))
    assert np.all(np.isnan(y))


def test_take_rows_matches_jnp_take():
    table = jnp.asarray(np.random.default_rng(4).normal(size=(10, 8)), jnp.bfloat16)
    ids = jnp.asarray([[3, 0, 9]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.take_rows)(table, ids)),
                                  np.asarray(jnp.take(table, ids, axis=0)))
    bad = jnp.asarray([[3, 10, -1, -11]], jnp.int32)  # negative ids wrap, out of range: NaN (jnp.take's fill)
    ours, ref = np.asarray(jax.jit(cpu_kernels.take_rows)(table, bad)), np.asarray(jnp.take(table, bad, axis=0))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])


needs_native = pytest.mark.skipif(not native.available(), reason="no C++ compiler: the XLA formulations serve")
NATIVE = [False, pytest.param(True, marks=needs_native)]


@pytest.mark.parametrize("native_kernel", NATIVE)
@pytest.mark.parametrize("M,E,k,offset", [
    (1, 8, 4, None),   # decode: rows
    (40, 8, 3, None),  # tiles
    (3, 8, 2, 4),      # an expert-parallel slice (experts 4..7 held), rows
    (40, 8, 2, 4),     # the same, tiles
])
def test_cpu_experts_match_dense_reference(M, E, k, offset, native_kernel):
    cfg = tiny_config(num_local_experts=E, num_experts_per_tok=k)
    p = make(E, cfg.hidden_size, cfg.intermediate_size, seed=M + E)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(M, cfg.hidden_size)).astype(np.float32)
    idx = np.argsort(-rng.normal(size=(M, E)), axis=1)[:, :k].astype(np.int32)
    weights = rng.dirichlet(np.ones(k), size=M).astype(np.float32)
    held, start = (p, None) if offset is None else ({n: v[offset:] for n, v in p.items()}, jnp.int32(offset))
    # the slice's share: rows routed to the experts it holds
    ref = dense_reference(x, weights if offset is None else np.where(idx >= offset, weights, 0), idx, p, cfg)
    kw = dict(rows_fn=functools.partial(cpu_kernels.experts_rows, native_kernel=native_kernel),
              tile_fn=functools.partial(cpu_kernels.expert_tile, native_kernel=native_kernel),
              tile_rows=cpu_kernels.tile_rows(M * k, held["w1_blocks"].shape[0]))
    ours = jax.jit(lambda x, w, i: experts_xla(x, w, i, held, cfg, start, **kw))(x, weights, idx)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_tile_rows_follow_the_mean_group():
    assert cpu_kernels.tile_rows(4, 32) == 16 and cpu_kernels.tile_rows(512, 32) == 32
    assert cpu_kernels.tile_rows(10**6, 32) == 128


def test_runtime_chooses_the_cpu_formulations_on_cpu_only_for_xla():
    rt = Runtime.create("xla")
    assert rt.moe.cpu_decode and rt.dense.cpu_rows > 0 and rt.moe.native == native.available()
    rt = Runtime.create("pallas")
    assert rt.dense == XlaDense() and not hasattr(rt.moe, "cpu_decode")


CFG = tiny_config(vocab_size=512, hidden_size=64, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)
ckpt, model = checkpoint_fixtures(CFG, "cpu_kernels", seed=11)


def with_runtime(model, runtime):
    graphdef, state = nnx.split(model)
    other = nnx.merge(graphdef, state)
    other.runtime = runtime
    return other


def test_generation_matches_the_plain_xla_ops(model):
    """Greedy float32 generation (prefill tiles, then decode rows) with the CPU formulations equals
    the plain XLA ops' tokens, and their logprobs agree."""
    assert model.runtime.moe.cpu_decode
    plain = with_runtime(model, Runtime(attention=XlaAttention(), moe=XlaMoE(), dense=XlaDense()))
    ids = np.random.default_rng(6).integers(0, CFG.vocab_size, (1, 40)).astype(np.int32)
    kw = dict(max_new_tokens=12, temperature=0.0, stop_tokens=(), return_logprobs=True)
    ours, ref = generate(model, ids, **kw), generate(plain, ids, **kw)
    np.testing.assert_array_equal(ours.tokens, ref.tokens)
    np.testing.assert_allclose(ours.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


def test_decode_loop_holds_no_converted_weight_copy(ckpt):
    """The compiled decode loop of a bfloat16 model needs less temporary memory than a float32 copy
    of its lm_head: no weight is converted outside the fused products (XLA's loop-invariant code
    motion would otherwise hoist the conversions and keep the copies)."""
    from gptoss_jax import load_model
    from gptoss_jax.generate import _decode_loop, _prefill, _setup

    bf16 = load_model(ckpt, dtype="bfloat16", kernels="xla", progress=False)
    ids, lengths, s, max_len, chunk = _setup(bf16, [[1, 2, 3]], 16, 0.0, None, None, 0, (), None, 512)
    graphdef, state = nnx.split(bf16)
    cache, logits0 = _prefill(bf16, graphdef, state, ids, lengths, max_len, chunk)
    compiled = _decode_loop.lower(graphdef, state, cache, logits0, s, np.int32(16), 16).compile()
    lm_head_f32 = CFG.vocab_size * CFG.hidden_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < lm_head_f32


def test_cpu_xla_flags_add_only_what_the_user_did_not_set(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n")
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce --other=1"}
    flags = platforms.cpu_xla_flags(env, cpuinfo=str(cpuinfo))
    assert flags == env["XLA_FLAGS"]
    assert "--xla_cpu_experimental_ynn_fusion_type=reduce" in flags and "individual_dot" not in flags
    assert "--xla_cpu_prefer_vector_width=512" in flags and "--other=1" in flags
    cpuinfo.write_text("flags : fpu sse avx2\n")
    env = {}
    platforms.cpu_xla_flags(env, cpuinfo=str(cpuinfo))
    assert env["XLA_FLAGS"] == ("--xla_cpu_experimental_ynn_fusion_type=individual_dot "
                                "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    assert platforms.cpu_xla_flags(env, cpuinfo=str(cpuinfo)) == env["XLA_FLAGS"]  # idempotent


def test_token_clock_reports_first_token_and_decode_rate():
    from gptoss_jax.cli import TokenClock

    now = iter([0.0, 3.0, 4.0, 4.5, 5.0, 5.5])  # start, then 5 tokens: the 2nd step compiles
    clock = TokenClock(7, clock=lambda: next(now))
    for _ in range(5):
        clock.tick()
    assert clock.summary() == "7 prompt tokens, first token after 3.00 s; 5 tokens generated, decode 2.00 tokens/s"
    one = TokenClock(2, clock=iter([0.0, 1.0]).__next__)
    one.tick()
    assert one.summary() == "2 prompt tokens, first token after 1.00 s; 1 token generated"


@needs_native
def test_native_mxfp4_rows_match_the_xla_formulation():
    blocks, scales = every_code(3 * 40, 4, 100, 140, seed=7)
    blocks, scales = blocks.reshape(3, 40, 4, 16), scales.reshape(3, 40, 4)  # 3 experts of [40, 128]
    x = jnp.asarray(np.random.default_rng(8).normal(size=(5, 128)), jnp.float32)
    e = jnp.asarray([2, 0, 2, 1, 7], jnp.int32)  # 7: out of range, clamped as XLA's gather clamps
    ours = jax.jit(cpu_kernels.mxfp4_rows)(x, blocks, scales, e)
    ref = cpu_kernels.mxfp4_matvec(x, blocks[e], scales[e])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6 * float(jnp.abs(ref).max()))
    dy = jnp.asarray(np.random.default_rng(9).normal(size=(5, 40)), jnp.float32)
    g = jax.grad(lambda x: jnp.vdot(cpu_kernels.mxfp4_rows(x, blocks, scales, e), dy))(x)
    g_ref = jax.grad(lambda x: jnp.vdot(cpu_kernels.mxfp4_matvec(x, blocks[e], scales[e]), dy))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_native_build_failure_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    bad = tmp_path / "cxx"
    bad.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo fake; exit 0; fi\necho broken >&2\nexit 1\n')
    bad.chmod(0o755)
    with caplog.at_level("WARNING", logger=native.__name__):
        assert native.load(str(bad)) is False
    assert "native CPU kernels unavailable" in caplog.text and "broken" in caplog.text
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache
    assert native.load(None) is False


@needs_native
def test_native_dequant_is_dequantize():
    blocks, scales = every_code(48, 3, 2, 252, seed=12)
    ours = jax.jit(native.mxfp4_dequant_call)(blocks, scales)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(mxfp4.dequantize(blocks, scales, jnp.bfloat16)))
