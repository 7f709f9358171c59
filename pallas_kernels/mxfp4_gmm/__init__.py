"""MXFP4 grouped (ragged) matmul for the gpt-oss MoE experts (Pallas: Triton on GPU, Mosaic on TPU).

API
---
    w = prepare(blocks_ENGB, scales_ENG, interleaved_glu=False)   # one-time re-layout at load
    y = gmm(x_MK, w, group_sizes_E, *, bias=None, epilogue=None | "swiglu",
            swiglu_alpha=None, swiglu_limit=None, row_weights=None, out_dtype=None, impl="auto")

* `blocks` [E, N, K/32, 16] uint8 / `scales` [E, N, K/32] uint8 are the checkpoint tensors
  (`pallas_kernels.mxfp4`). `prepare` returns an `MXFP4GmmWeights` pytree (int32 `wq`, `ws`; layout
  in `layout.py`); `interleaved_glu=True` de-interleaves gpt-oss gate_up_proj rows (2j = gate_j,
  2j+1 = up_j) into a gate and an up split and is required for `epilogue="swiglu"`.
  `assume_normal_scales` (default: checked on concrete scales) enables the ~10-op decoder that
  is exact for E8M0 scales in [2, 252] (every real checkpoint); otherwise the general decoder.
* `x` [M, K] bf16 or f32 (the compute dtype; f32 accumulation); rows sorted by expert;
  `group_sizes` [E] int32 rows per expert (empty groups allowed, sum <= M; rows past the sum
  come out as zeros).
* `bias`: [E, N_ckpt] in checkpoint layout (interleaved for gate/up) or [E, S, N] prepared
  (`prepare_bias`); any float dtype.
* `epilogue=None`: y = (x @ W_e^T + b_e) [* row_weights[:, None]] -> [M, N].
  `epilogue="swiglu"`: y_pre = x @ W1_e^T + b1_e, gate = min(g, limit), up = clip(u, -limit, limit),
  out = (up + 1) * gate * sigmoid(alpha * gate) -> [M, N/2] (then * row_weights if given).
* `out_dtype` defaults to x.dtype.
* `impl` (`pallas_kernels.impl.Impl` or its string value, one vocabulary for every kernel
  package): "auto" (Triton on GPU, Mosaic on TPU, otherwise `CPU_DEFAULT_IMPL` =
  "mosaic_interpret"), "triton", "mosaic", "triton_interpret" / "mosaic_interpret" (that kernel
  body under the Pallas interpreter), "reference" (dequantize + ragged_dot). `resolve_impl(impl)`
  returns the `Impl` that `gmm` would run here.
* Every `pallas_call` carries a `pl.CostEstimate` (`common.gmm_cost_estimate`).
* Differentiable (`jax.custom_vjp`) w.r.t. x, bias and row_weights; the weights are frozen
  (float0 / zero cotangents). The backward pass dequantizes the experts and uses
  `jax.lax.ragged_dot` (not a Pallas kernel).

`unprepare(w)` inverts `prepare` exactly (back to checkpoint blocks / scales, for export).

`reference.gmm_reference` is the pure-jnp reference on checkpoint-layout weights.
"""

from ..impl import Impl
from .layout import MXFP4GmmWeights, dequantize_prepared, prepare, prepare_bias, unprepare
from .ops import CPU_DEFAULT_IMPL, IMPLS, gmm, resolve_impl
from .reference import gmm_reference

__all__ = ["CPU_DEFAULT_IMPL", "IMPLS", "Impl", "MXFP4GmmWeights", "dequantize_prepared", "gmm",
           "gmm_reference", "prepare", "prepare_bias", "resolve_impl", "unprepare"]
