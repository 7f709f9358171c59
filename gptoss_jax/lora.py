"""LoRA adapters over the frozen gpt-oss base (the MXFP4 experts stay packed and untouched).

An adapter on a projection W (input axes `in`, output axes `out`) adds ``scale * (x A) B`` to its
output, with A [*in, r], B [r, *out] and ``scale = alpha / r``. B starts at zero, so a freshly adapted
model computes exactly what the base model computes. The adapters are `LoRAParam` variables, a type
of their own: optimizers select them with ``wrt=LoRAParam`` and nothing else moves.

Targets (names of `targets=`):
  "q", "k", "v", "o"  the attention projections (default: all four), on every layer;
  "router"            the MoE router (W [D, E]), optional.
Per-expert adapters on the MXFP4 experts are not implemented.

    model = load_model("openai/gpt-oss-20b")
    apply_lora(model, rank=8, alpha=16)           # adds LoRAParam leaves, model unchanged
    ... train with nnx.Optimizer(model, tx, wrt=LoRAParam) (see gptoss_jax.finetune) ...
    merge_lora(model)                             # W += scale * A B, adapters removed
    save_checkpoint(model, "out")                 # Hugging Face layout, experts still packed
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTENTION_TARGETS = ("q", "k", "v", "o")
TARGETS = ATTENTION_TARGETS + ("router",)
DEFAULT_TARGETS = ATTENTION_TARGETS

# target -> (module attribute under a block, weight attribute, number of input axes)
_WEIGHTS = {"q": ("attn", "wq_DNH", 1), "k": ("attn", "wk_DKH", 1), "v": ("attn", "wv_DKH", 1),
            "o": ("attn", "wo_NHD", 2), "router": ("mlp", "wr_DE", 1)}


class LoRAParam(nnx.Variable):
    """A LoRA factor (A or B). Kept in float32 whatever the base weights' dtype."""


def _targets(targets: Sequence[str] | str | None) -> tuple[str, ...]:
    if targets is None:
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
    return tuple(t for t in TARGETS if t in targets)


def apply_lora(model, *, rank: int = 8, alpha: float | None = None, targets: Sequence[str] | str | None = None,
               seed: int = 0, init_b_zero: bool = True):
    """Attach LoRA adapters (in place) to every block of `model`; returns the model.

    A ~ N(0, 1/fan_in) (fan_in = the projection's input size), B = 0 (the adapted model equals the
    base). `alpha` defaults to 2 * rank. `init_b_zero=False` draws B like A (tests only).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora or strip them first)")
    targets = _targets(targets)
    alpha = float(2 * rank if alpha is None else alpha)
    key = jax.random.key(seed)
    for i, block in enumerate(model.blocks):
        for t in targets:
            mod_name, w_name, n_in = _WEIGHTS[t]
            mod = getattr(block, mod_name)
            w = getattr(mod, w_name)[...]
            in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
            ka, kb = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), TARGETS.index(t)))
            fan_in = math.prod(in_shape)
            a = jax.random.normal(ka, (*in_shape, rank), jnp.float32) / math.sqrt(fan_in)
            b = (jnp.zeros((rank, *out_shape), jnp.float32) if init_b_zero
                 else jax.random.normal(kb, (rank, *out_shape), jnp.float32) / math.sqrt(rank))
            a, b = _like(a, w), _like(b, w)
            setattr(mod, f"lora_{t}_a", LoRAParam(a))
            setattr(mod, f"lora_{t}_b", LoRAParam(b))
            mod.lora_scale = alpha / rank
    return model


def _like(x, w):
    """Place x on the devices of w (replicated when w is sharded)."""
    sharding = getattr(w, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return x


def _adapted(model):
    """(module, target) for every adapter present."""
    for block in model.blocks:
        for t in TARGETS:
            mod = getattr(block, _WEIGHTS[t][0])
            if getattr(mod, f"lora_{t}_a", None) is not None:
                yield mod, t


def has_lora(model) -> bool:
    return any(True for _ in _adapted(model))


def lora_info(model) -> dict:
    """{"rank", "alpha", "targets", "parameters"} of the adapters present (empty dict if none)."""
    found = list(_adapted(model))
    if not found:
        return {}
    mod, t = found[0]
    rank = getattr(mod, f"lora_{t}_a")[...].shape[-1]
    n = sum(int(np.prod(getattr(m, f"lora_{x}_{ab}")[...].shape)) for m, x in found for ab in "ab")
    return {"rank": int(rank), "alpha": float(mod.lora_scale * rank),
            "targets": sorted({x for _, x in found}, key=TARGETS.index), "parameters": n}


def lora_delta_weight(mod, t) -> jax.Array:
    """scale * A B in float32, shaped like the adapted weight."""
    a = getattr(mod, f"lora_{t}_a")[...].astype(jnp.float32)
    b = getattr(mod, f"lora_{t}_b")[...].astype(jnp.float32)
    return mod.lora_scale * jnp.tensordot(a, b, axes=1)


def _remove(mod, t):
    delattr(mod, f"lora_{t}_a")
    delattr(mod, f"lora_{t}_b")
    if not any(getattr(mod, f"lora_{x}_a", None) is not None for x in TARGETS):
        delattr(mod, "lora_scale")


def merge_lora(model):
    """Fold every adapter into its base weight (W <- W + scale * A B, computed in float32 and cast to
    W's dtype) and remove the adapters, in place; returns the model. The result has exactly the
    parameters of the base architecture, so `save_checkpoint` exports it."""
    for mod, t in list(_adapted(model)):
        w_var = getattr(mod, _WEIGHTS[t][1])
        w = w_var[...]
        w_var[...] = (w.astype(jnp.float32) + lora_delta_weight(mod, t)).astype(w.dtype)
        _remove(mod, t)
    return model


def strip_lora(model):
    """Remove the adapters without merging them (back to the base model); returns the model."""
    for mod, t in list(_adapted(model)):
        _remove(mod, t)
    return model
