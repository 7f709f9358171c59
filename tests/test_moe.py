"""The XLA MoE paths (per-row gather for decode, expert tiles otherwise) against a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mxfp4
from gptoss_jax.layers import experts_xla, route, swiglu

from helpers import tiny_config


def make(E, D, F, seed):
    rng = np.random.default_rng(seed)
    w1b, w1s = mxfp4.random_packed_np(rng, (E, 2 * F, D))
    w2b, w2s = mxfp4.random_packed_np(rng, (E, D, F))
    return {"w1_blocks": jnp.asarray(w1b), "w1_scales": jnp.asarray(w1s), "w2_blocks": jnp.asarray(w2b),
            "w2_scales": jnp.asarray(w2s), "b1": jnp.asarray(rng.normal(size=(E, 2 * F)) * 0.1, jnp.float32),
            "b2": jnp.asarray(rng.normal(size=(E, D)) * 0.1, jnp.float32)}


def dense_reference(x, weights, idx, p, cfg):
    """Every token through each of its k experts, one at a time (float32 numpy)."""
    w1 = np.asarray(mxfp4.dequantize(p["w1_blocks"], p["w1_scales"], jnp.float32))
    w2 = np.asarray(mxfp4.dequantize(p["w2_blocks"], p["w2_scales"], jnp.float32))
    out = np.zeros(x.shape, np.float64)
    for m in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[m, j]
            h = w1[e] @ x[m] + np.asarray(p["b1"][e])
            h = np.asarray(swiglu(jnp.asarray(h), cfg.swiglu_alpha, cfg.swiglu_limit))
            out[m] += weights[m, j] * (w2[e] @ h + np.asarray(p["b2"][e]))
    return out


@pytest.mark.parametrize("M,E,k,skew", [
    (1, 8, 4, False),     # decode: gather path
    (3, 32, 4, False),    # decode with more experts
    (40, 8, 3, False),    # tiles, some experts empty or partly filled
    (300, 4, 2, False),   # groups straddle several 128-row tiles
    (300, 8, 2, True),    # most rows on one expert, others empty
])
def test_experts_match_dense_reference(M, E, k, skew):
    cfg = tiny_config(num_local_experts=E, num_experts_per_tok=k)
    D, F = cfg.hidden_size, cfg.intermediate_size
    p = make(E, D, F, seed=M + E)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(M, D)).astype(np.float32)
    logits = rng.normal(size=(M, E))
    if skew:
        logits[:, 0] += 10.0
    idx = np.argsort(-logits, axis=1)[:, :k].astype(np.int32)
    weights = rng.dirichlet(np.ones(k), size=M).astype(np.float32)
    ours = jax.jit(lambda x, w, i: experts_xla(x, w, i, p, cfg))(x, weights, idx)
    ref = dense_reference(x, weights, idx, p, cfg)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("M", [2, 200])
def test_gradient_wrt_activations_matches_dense(M):
    cfg = tiny_config(num_local_experts=8, num_experts_per_tok=3)
    D, F, E = cfg.hidden_size, cfg.intermediate_size, 8
    p = make(E, D, F, seed=1)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
    wr = jnp.asarray(rng.normal(size=(D, E)) * 0.3, jnp.float32)
    br = jnp.zeros((E,), jnp.float32)
    w1 = mxfp4.dequantize(p["w1_blocks"], p["w1_scales"], jnp.float32)
    w2 = mxfp4.dequantize(p["w2_blocks"], p["w2_scales"], jnp.float32)

    def ours(x):
        weights, idx = route(x, wr, br, 3)
        return jnp.sum(jnp.sin(experts_xla(x, weights, idx, p, cfg)))

    def dense(x):  # every expert on every token, masked by the routing
        weights, idx = route(x, wr, br, 3)
        h = swiglu(jnp.einsum("MD,END->MEN", x, w1) + p["b1"], cfg.swiglu_alpha, cfg.swiglu_limit)
        y = jnp.einsum("MEF,EDF->MED", h, w2) + p["b2"]
        gate = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], idx].set(weights)
        return jnp.sum(jnp.sin(jnp.einsum("MED,ME->MD", y, gate)))

    g_ours, g_dense = jax.grad(ours)(x), jax.grad(dense)(x)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_dense), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g_dense).max()))
