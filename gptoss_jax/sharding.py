"""Sharding: one device mesh (`data`, `expert`, `model`), one rules table, expert parallelism.

Mesh axes (any subset, any of size 1):
  data    batch rows (activations, KV cache rows);
  expert  the E axis of the MoE weights (expert parallelism, EP);
  model   attention heads (q / kv heads, sinks, biases) and the vocabulary (embed, lm_head) (TP).

`ShardingRules` maps each parameter name to logical axes, and logical axes to mesh axes. A logical
axis whose dimension is not divisible by its mesh axis size is replicated instead (e.g. 8 kv heads
on a model axis of 16), except the expert axis, which must divide the expert count.

The MoE runs in `shard_map`: the routing (a small [M, E] matmul) is computed outside, tokens are
already replicated over `expert` (they are only split over `data`), so every device of an expert
group runs the dropless grouped matmul of `layers.experts_xla` on its own E/n experts
(rows routed elsewhere contribute zero) and one `psum` over `expert` combines them. Inside the map
the rows are additionally split over `model` where divisible, so model-parallel devices do not
repeat each other's expert work. See docs/sharding.md for the trade-offs against all-to-all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
    from .params import param_leaves

    return {p: rules.spec(rules.logical(str(p[-1]))[:len(leaf.shape)], leaf.shape, mesh)
            for p, leaf in param_leaves(model).items()}


def param_shardings(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict[tuple, NamedSharding]:
    return {p: NamedSharding(mesh, s) for p, s in param_specs(model, mesh, rules).items()}


def attach(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Record the mesh on the model (static, part of the graphdef): the MoE layers then dispatch
    through `experts_sharded`, inputs are placed batch-over-data and the KV cache is constrained
    to its rules. Parameters must already carry the shardings of `param_shardings`."""
    E = model.config.num_local_experts
    n_e = mesh.shape.get(rules.experts, 1) if rules.experts else 1
    if E % n_e:
        raise ValueError(f"{E} experts are not divisible by the expert mesh axis of size {n_e}")
    model.mesh = mesh
    model.sharding_rules = rules
    for block in model.blocks:
        block.mlp.mesh = mesh
        block.mlp.sharding_rules = rules
    return model


def shard_model(model, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Reshard an already loaded (e.g. single-device) model onto `mesh` and attach it."""
    from .params import assemble, param_leaves

    sh = param_shardings(model, mesh, rules)
    arrays = {p: jax.device_put(v, sh[p]) for p, v in param_leaves(model).items()}
    new = assemble(model, arrays)
    new.generation_defaults = model.generation_defaults
    return attach(new, mesh, rules)


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


def constrain_cache(cache, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """with_sharding_constraint on every cache array (inside jit)."""
    specs = cache_specs(cache, mesh, rules)
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), cache, specs)


# ---------------------------------------------------------------------------------------------
# Expert parallelism
# ---------------------------------------------------------------------------------------------
def _token_axes(M: int, mesh: Mesh, rules: ShardingRules) -> tuple[str, ...]:
    """Mesh axes that split the M routed tokens inside the MoE map: data (as the batch), then model
    (so model-parallel devices share the expert work), each only while it divides M."""
    axes, n = [], 1
    for ax in (rules.batch, rules.heads):
        if ax and ax in mesh.shape and mesh.shape[ax] > 1 and ax != rules.experts and M % (n * mesh.shape[ax]) == 0:
            axes.append(ax)
            n *= mesh.shape[ax]
    return tuple(axes)


def experts_sharded(x_MD, weights_Mk, idx_Mk, p, cfg, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                    run=None):
    """The MoE over the mesh: dropless, every token's k experts evaluated exactly once.

    Tokens [M, D] split over data (and model) enter a shard_map; each expert-axis device evaluates
    its E/n experts with `run` (default `experts_xla`, given the global id offset of its slice) and
    a psum over `expert` sums the k contributions of each token. Output: [M, D] split like the input.
    """
    from .layers import experts_xla

    run = experts_xla if run is None else run
    M, D = x_MD.shape
    E = cfg.num_local_experts
    ex = rules.experts if rules.experts and rules.experts in mesh.shape else None
    n_e = mesh.shape[ex] if ex else 1
    if E % n_e:
        raise ValueError(f"{E} experts are not divisible by the expert mesh axis of size {n_e}")
    tok = _token_axes(M, mesh, rules)
    tok_spec = P(tok if tok else None, None)
    e_spec = {name: P(ex if n_e > 1 else None, *([None] * (v.ndim - 1))) for name, v in p.items()}

    def local(x, w, idx, pl):
        if n_e == 1:
            return run(x, w, idx, pl, cfg)
        offset = jax.lax.axis_index(ex) * (E // n_e)
        y = run(x, w, idx, pl, cfg, expert_offset=offset)
        return jax.lax.psum(y, ex)

    return jax.shard_map(local, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, e_spec), out_specs=tok_spec,
                         check_vma=False)(x_MD, weights_Mk, idx_Mk, p)


def expert_sharding(mesh: Mesh, rules: ShardingRules, num_experts: int) -> NamedSharding:
    """Sharding of a [E, ...] expert array: E over the expert axis, the rest replicated."""
    return NamedSharding(mesh, rules.spec(("experts",), (num_experts,), mesh))


def attention_sharded(fn, args, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Run an attention kernel `fn(*args)` per shard: arrays [B, T|S, heads, H] split B over data and
    heads over model (q heads and kv heads only together, so each shard keeps whole GQA groups),
    [N] sinks like the q heads, [B] per-row lengths like B. Tensor-parallel attention, no
    communication inside."""
    q = args[0]
    B, N = q.shape[0], q.shape[2]
    K = next(a.shape[2] for a in args[1:] if a.ndim == 4)
    b_ax = rules.spec(("batch",), (B,), mesh)[0]
    h_ax = rules.spec(("heads",), (math.gcd(N, K),), mesh)[0]

    def spec(a):
        if a.ndim == 4:
            return P(b_ax, None, h_ax, None)
        if a.ndim == 1 and a.shape[0] == N and a.dtype != jnp.int32:
            return P(h_ax)
        return P(b_ax)  # [B] int32 lengths / offsets

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in args), out_specs=spec(q),
                         check_vma=False)(*args)


# ---------------------------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------------------------
def bytes_per_device(model) -> dict:
    """{device: bytes of parameters resident there} (addressable devices only)."""
    from .params import param_leaves

    out: dict = {}
    for leaf in param_leaves(model).values():
        for s in leaf.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out


def describe(mesh: Mesh) -> str:
    return ", ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({math.prod(mesh.shape.values())} devices)"
