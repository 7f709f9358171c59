"""Parameter-tree utilities: flat paths to and from NNX state, assembling a model from arrays."""

from __future__ import annotations

import jax
from flax import nnx

from .errors import CheckpointError

ParamPath = tuple  # e.g. ("blocks", 3, "attn", "wq_DNH")


def flat_key(p: ParamPath) -> str:
    return "/".join(str(x) for x in p)


def param_path(key: tuple) -> ParamPath:
    return tuple(k.key if hasattr(k, "key") else k for k in key)


def assemble(abstract_model, arrays: dict[ParamPath, jax.Array]):
    """Abstract model + concrete arrays keyed by param path -> model (every leaf must be given)."""
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    leaves = []
    for key, var in flat:
        p = param_path(key)
        if p not in arrays:
            raise CheckpointError(f"no value loaded for parameter {flat_key(p)}")
        leaves.append((key, var.replace(arrays[p])))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def param_leaves(model) -> dict[ParamPath, jax.Array | jax.ShapeDtypeStruct]:
    """Parameter path -> leaf (arrays; ShapeDtypeStructs for an abstract model)."""
    return {param_path(k): (v.get_value() if hasattr(v, "get_value") else v.value)
            for k, v in nnx.to_flat_state(nnx.state(model))}
