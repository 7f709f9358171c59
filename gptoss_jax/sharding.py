"""Sharding specs and placements: one device mesh (`data`, `expert`, `model`), one rules table.

Mesh axes (any subset, any of size 1):
  data    batch rows (activations, KV cache rows);
  expert  the E axis of the MoE weights (expert parallelism, EP);
  model   attention heads (q / kv heads, sinks, biases) and the vocabulary (embed, lm_head) (TP).

`ShardingRules` maps each parameter name to logical axes, and logical axes to mesh axes. A logical
axis whose dimension is not divisible by its mesh axis size is replicated instead (e.g. 8 kv heads
on a model axis of 16), except the expert axis, which must divide the expert count.

This module computes PartitionSpecs and places host arrays only. The computations that need the
mesh (the expert-parallel MoE and the attention kernels in `shard_map`) are the op objects of
`gptoss_jax.ops`, and `gptoss_jax.runtime.Runtime` carries the mesh and rules into the model.
Any mesh works: `make_mesh` below, `jax.make_mesh` (Explicit axes, JAX's default) or
`jax.sharding.Mesh` (Auto axes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .params import param_leaves

AXES = ("data", "expert", "model")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis, and parameter name -> logical axes per dimension.

    The parameter table is keyed by the last element of the parameter path (names are unique per
    module kind: ("blocks", 3, "attn", "wq_DNH") -> "wq_DNH"; the two norms of a block and the
    final norm share "norm", replicated).
    """

    batch: str | None = "data"
    experts: str | None = "expert"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    vocab: str | None = "model"
    params: tuple = (
        # embeddings and head
        ("embed_VD", ("vocab", None)),
        ("lm_head_VD", ("vocab", None)),
        ("norm", (None,)),
        # attention
        ("wq_DNH", (None, "heads", None)),
        ("wk_DKH", (None, "kv_heads", None)),
        ("wv_DKH", (None, "kv_heads", None)),
        ("wo_NHD", ("heads", None, None)),
        ("bq_NH", ("heads", None)),
        ("bk_KH", ("kv_heads", None)),
        ("bv_KH", ("kv_heads", None)),
        ("bo_D", (None,)),
        ("sinks_N", ("heads",)),
        # mixture of experts: router replicated, experts over E
        ("wr_DE", (None, None)),
        ("br_E", (None,)),
        ("w1_blocks", ("experts", None, None, None)),
        ("w1_scales", ("experts", None, None)),
        ("w2_blocks", ("experts", None, None, None)),
        ("w2_scales", ("experts", None, None)),
        # the same experts re-laid for the Pallas kernel (layers.MoE.to_kernel_layout)
        ("w1_q", ("experts", None, None, None)),
        ("w1_s", ("experts", None, None, None)),
        ("w2_q", ("experts", None, None, None)),
        ("w2_s", ("experts", None, None, None)),
        ("b1", ("experts", None)),
        ("b2", ("experts", None)),
    )
    cache: tuple = ("batch", None, "kv_heads", None)  # KVCache k/v [B, S, K, H]

    def logical(self, name: str) -> tuple:
        for n, axes in self.params:
            if n == name:
                return axes
        if name.startswith("lora_"):  # adapters are small: replicated
            return (None,) * 8
        raise KeyError(f"no sharding rule for parameter {name!r}; add it to ShardingRules.params")

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else getattr(self, logical)

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
        """PartitionSpec for one array: each logical axis mapped to its mesh axis when that axis is
        in the mesh and divides the dimension, otherwise replicated."""
        out = []
        for logical, dim in zip(logical_axes, shape):
            ax = self.mesh_axis(logical)
            if ax is None or ax not in mesh.shape or mesh.shape[ax] == 1:
                out.append(None)
            elif dim % mesh.shape[ax]:
                if logical == "experts":
                    raise ValueError(f"{dim} experts are not divisible by the {ax!r} mesh axis of size "
                                     f"{mesh.shape[ax]}")
                out.append(None)
            else:
                out.append(ax)
        return P(*out)


DEFAULT_RULES = ShardingRules()


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------
def make_mesh(data: int = 1, expert: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, expert, model) mesh over `devices` (default: all global devices, in order).

    Devices are laid out data-major, model-minor, so the model axis (the chattiest: a reduction per
    attention block) lands on neighbouring devices (same host / same ICI ring)."""
    devices = jax.devices() if devices is None else list(devices)
    n = data * expert * model
    if n != len(devices):
        raise ValueError(f"mesh data={data} x expert={expert} x model={model} = {n} devices, "
                         f"but {len(devices)} are given")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, expert, model), AXES)


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,expert=4,model=1" -> {"data": 2, "expert": 4, "model": 1} (missing axes are 1)."""
    out = {a: 1 for a in AXES}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"mesh entry {part!r} is not axis=size")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in AXES:
            raise ValueError(f"unknown mesh axis {k!r}; axes are {AXES}")
        if not v.strip().isdigit() or int(v) < 1:
            raise ValueError(f"mesh axis {k} must have a positive integer size, got {v!r}")
        out[k] = int(v)
    return out


# ---------------------------------------------------------------------------------------------
# Parameters, cache, inputs
# ---------------------------------------------------------------------------------------------
def param_specs(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict[tuple, P]:
    """Parameter path -> PartitionSpec for every parameter of `model` (concrete or abstract)."""
    return {p: rules.spec(rules.logical(str(p[-1]))[:len(leaf.shape)], leaf.shape, mesh)
            for p, leaf in param_leaves(model).items()}


def param_shardings(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict[tuple, NamedSharding]:
    return {p: NamedSharding(mesh, s) for p, s in param_specs(model, mesh, rules).items()}


def batch_spec(batch: int, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, ndim: int = 2) -> P:
    return rules.spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1), mesh)


def put_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host array on every process: each process places only the
    slices of its own devices (works single- and multi-process)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_batch(host_ids: np.ndarray, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    host_ids = np.asarray(host_ids)
    return put_global(host_ids, NamedSharding(mesh, batch_spec(host_ids.shape[0], mesh, rules, host_ids.ndim)))


def cache_specs(cache, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """KVCache -> KVCache of PartitionSpecs: k/v [B, S, K, H] with B over data, K over model when
    divisible; lengths [B] like B."""
    kv = lambda a: rules.spec(rules.cache, a.shape, mesh)  # noqa: E731
    return cache.replace(k=tuple(kv(a) for a in cache.k), v=tuple(kv(a) for a in cache.v),
                         lengths=rules.spec(("batch",), cache.lengths.shape, mesh))


def expert_sharding(mesh: Mesh, rules: ShardingRules, num_experts: int) -> NamedSharding:
    """Sharding of a [E, ...] expert array: E over the expert axis, the rest replicated."""
    return NamedSharding(mesh, rules.spec(("experts",), (num_experts,), mesh))


def expert_axis_size(mesh: Mesh | None, rules: ShardingRules, num_experts: int) -> int:
    """Devices along the expert axis (1 without one); it must divide the expert count."""
    ax = rules.experts
    n = mesh.shape[ax] if mesh is not None and ax and ax in mesh.shape else 1
    if num_experts % n:
        raise ValueError(f"{num_experts} experts are not divisible by the expert mesh axis of size {n}")
    return n


def compute_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis Auto: the mesh the model's sharding
    constraints and shard_maps are written for. A mesh with Explicit axes (`jax.make_mesh`'s
    default) keeps its own types outside: `Runtime.auto_region` runs the model under `auto_axes`."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def is_explicit(mesh: Mesh | None) -> bool:
    return mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)



# ---------------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------------
def bytes_per_device(model) -> dict:
    """{device: bytes of parameters resident there} (addressable devices only)."""
    out: dict = {}
    for leaf in param_leaves(model).values():
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
