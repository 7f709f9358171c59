"""The execution context: mesh, sharding rules and op objects, fixed when the model is built.

    rt = Runtime.create(kernels="pallas", mesh=jax.make_mesh((2, 2, 2), ("data", "expert", "model")))
    model = GptOss(cfg, runtime=rt)          # or load_model(path, kernels=..., mesh=...)

Every layer reads the mesh and the ops from here; nothing is attached to the model afterwards.
The context is frozen and hashable (it is part of the model's graphdef, so jit specialises on it).

Meshes of any axis type work. The model's own sharding constraints and shard_maps are written for
Auto axes (GSPMD propagates the rest), so they use `compute_mesh`, the Auto twin of the mesh.
Parameters, inputs and outputs stay on the user's mesh; on a mesh with Explicit axes (the default
of `jax.make_mesh`) each entry point runs its body under `jax.sharding.auto_axes` and declares the
shardings of its outputs (`auto_region`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import native, sharding as shd
from .ops import (OPS, PAGED_OPS, PallasAttention, PallasMoE, PallasPagedAttention, XlaAttention, XlaDense, XlaMoE,
                  XlaPagedAttention)

KERNEL_CHOICES = ("auto", "xla", "pallas")
# Activation rows up to which the XLA ops use the XLA:CPU decode formulations (cpu_kernels) on a CPU
# backend: beyond two rows a library dot that reads each weight once beats reading it per row.
CPU_DENSE_ROWS = 2


def resolve_kernels(kernels: str) -> str:
    """"auto" -> "pallas" on GPU / TPU, "xla" elsewhere."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else "xla"
    return kernels


@dataclasses.dataclass(frozen=True)
class Runtime:
    attention: XlaAttention | PallasAttention
    moe: XlaMoE | PallasMoE
    mesh: Mesh | None = None  # the user's mesh, as given (any axis types)
    rules: shd.ShardingRules = shd.DEFAULT_RULES
    paged_attention: XlaPagedAttention | PallasPagedAttention = XlaPagedAttention()  # the engine's paged cache
    dense: XlaDense = XlaDense()  # the dense projections (q / k / v / o, lm_head)

    @classmethod
    def create(cls, kernels: str = "xla", mesh: Mesh | None = None,
               rules: shd.ShardingRules | None = None) -> "Runtime":
        """kernels: "xla", "pallas" or "auto"; mesh: any `jax.sharding.Mesh` with axes among
        ("data", "expert", "model") (others are left unused); rules: default `sharding.DEFAULT_RULES`."""
        rules = shd.DEFAULT_RULES if rules is None else rules
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        kernels = resolve_kernels(kernels)
        attention_cls, moe_cls = OPS[kernels]
        cm = None if mesh is None else shd.compute_mesh(mesh)
        attention = attention_cls(mesh=cm, rules=rules) if attention_cls is PallasAttention else attention_cls()
        moe, dense = moe_cls(mesh=cm, rules=rules), XlaDense()
        if moe_cls is XlaMoE and _platform(mesh) == "cpu":  # XLA:CPU: the decode formulations of cpu_kernels
            moe = XlaMoE(mesh=cm, rules=rules, cpu_decode=True, native=native.available())
            dense = XlaDense(cpu_rows=CPU_DENSE_ROWS)
        return cls(attention=attention, moe=moe, mesh=mesh, rules=rules, dense=dense,
                   paged_attention=PAGED_OPS[kernels](mesh=cm, rules=rules))

    @property
    def kernels(self) -> str:
        return self.moe.name

    @property
    def explicit(self) -> bool:
        """The mesh has Explicit axes: entry points run their bodies under `auto_region`."""
        return shd.is_explicit(self.mesh)

    @functools.cached_property
    def compute_mesh(self) -> Mesh | None:
        return None if self.mesh is None else shd.compute_mesh(self.mesh)

    # ---- specs and placement (on the user's mesh) ---------------------------------------------
    def spec(self, logical: tuple, shape: tuple) -> P:
        return P() if self.mesh is None else self.rules.spec(logical, shape, self.mesh)

    def param_shardings(self, model) -> dict | None:
        return None if self.mesh is None else shd.param_shardings(model, self.mesh, self.rules)

    def expert_sharding(self, num_experts: int) -> NamedSharding | None:
        return None if self.mesh is None else shd.expert_sharding(self.mesh, self.rules, num_experts)

    def place_batch(self, host: np.ndarray) -> jax.Array:
        """A host [B, ...] array (the same on every process) as a global array, B over `data`."""
        if self.mesh is None:
            return jax.numpy.asarray(host)
        return shd.shard_batch(np.asarray(host), self.mesh, self.rules)

    def cache_specs(self, cache):
        """A KV cache (`KVCache`, the engine's `PagedKVCache`) with a PartitionSpec per array."""
        if self.mesh is None:
            return jax.tree.map(lambda _: P(), cache)
        return cache.partition_specs(self.mesh, self.rules)

    def logits_spec(self, shape: tuple) -> P:
        """[B, (T,) V]: rows over batch, the vocabulary as the lm_head."""
        return self.spec(("batch",) + (None,) * (len(shape) - 2) + ("vocab",), shape)

    # ---- inside jit (on the compute mesh) ------------------------------------------------------
    def constrain_cache(self, cache):
        """with_sharding_constraint on every cache array (B over data, K over model)."""
        if self.mesh is None:
            return cache
        specs = cache.partition_specs(self.compute_mesh, self.rules)
        return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(self.compute_mesh, s)),
                            cache, specs)

    def auto_region(self, fn, out_specs):
        """`fn(*args)` with its body under Auto axes when the arguments live on a mesh with Explicit
        axes (outputs then carry `out_specs` there, a pytree of PartitionSpecs like the outputs);
        `fn` itself otherwise, or when already inside such a region."""
        if not self.explicit:
            return fn

        def wrapped(*args):
            leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "shape")]
            if not leaves or not _on_explicit_mesh(leaves[0]):
                return fn(*args)
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return jax.sharding.auto_axes(fn, axes=tuple(self.mesh.axis_names), out_sharding=out_specs)(*args)
        return wrapped


def _platform(mesh: Mesh | None) -> str:
    """The platform the model's programs run on: the mesh's devices', else the default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def _on_explicit_mesh(x) -> bool:
    """Whether x's type carries Explicit mesh axes (false inside an auto_axes region)."""
    mesh = jax.typeof(x).sharding.mesh
    return not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
