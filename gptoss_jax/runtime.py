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

from pallas_kernels.impl import Impl

from . import native, sharding as shd
from .ops import (OPS, PAGED_OPS, PallasAttention, PallasMoE, PallasPagedAttention, XlaAttention, XlaDense, XlaMoE,
                  XlaPagedAttention)

KERNEL_CHOICES = ("auto", "xla", "pallas")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
# XLA compiles Triton kernels (so Pallas on GPU) only from Ampere on ("Triton support is only enabled
# for Ampere GPUs (compute capability 8.0) and up"); bf16 tensor-core MMA also starts at sm_80:
# Turing (T4, sm_75) has f16 MMA only, and XLA upcasts its bf16 matmuls to f32 (copying the weights).
TRITON_MIN_CC = (8, 0)
BF16_MIN_CC = (8, 0)
# Activation rows up to which the XLA ops use the XLA:CPU decode formulations (cpu_kernels) on a CPU
# backend: beyond two rows a library dot that reads each weight once beats reading it per row.
CPU_DENSE_ROWS = 2


def target_device(mesh: Mesh | None = None):
    """The device the model's programs run on (the mesh's first; else the default device). Its
    kind decides "auto" kernels and dtype; a mesh of compile-only topology devices works too."""
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def gpu_compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for other devices (and ROCm's "gfx..." names)."""
    if device.platform not in ("gpu", "cuda"):
        return None
    major, _, minor = str(device.compute_capability).partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def resolve_kernels(kernels: str, device=None) -> str:
    """"auto" -> what runs on `device` (default: `target_device()`): "pallas" on TPU (Mosaic) and on
    GPUs from sm_80 (Triton: mma.sync on sm_80 / sm_89, wgmma on sm_90); "xla" on older GPUs (XLA
    compiles no Triton there) and on CPU."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels != "auto":
        return kernels
    device = target_device() if device is None else device
    if device.platform == "tpu":
        return "pallas"
    if device.platform in ("gpu", "cuda"):
        cc = gpu_compute_capability(device)
        return "pallas" if cc is None or cc >= TRITON_MIN_CC else "xla"
    return "xla"


def resolve_dtype(dtype: str, device=None) -> str:
    """"auto" -> the compute dtype `device` runs natively: "float16" on CUDA GPUs below sm_80 (f16
    activations, f32 accumulation and a f32 residual stream, see `GptOss`), "bfloat16" elsewhere."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    cc = gpu_compute_capability(target_device() if device is None else device)
    return "float16" if cc is not None and cc < BF16_MIN_CC else "bfloat16"


def kernel_impl(device) -> Impl:
    """The Pallas kernel body for `device`, fixed at construction (a deviceless compile runs on the
    CPU backend, so the kernels' own backend check would pick the interpreter)."""
    if device.platform == "tpu":
        return Impl.MOSAIC
    if device.platform in ("gpu", "cuda"):
        return Impl.TRITON
    return Impl.AUTO  # CPU: each package's interpreted default


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
        """kernels: "xla", "pallas" or "auto" (`resolve_kernels` for the mesh's devices); mesh: any
        `jax.sharding.Mesh` with axes among ("data", "expert", "model") (others are left unused);
        rules: default `sharding.DEFAULT_RULES`."""
        rules = shd.DEFAULT_RULES if rules is None else rules
        if mesh is not None and not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        device = target_device(mesh)
        kernels = resolve_kernels(kernels, device)
        attention_cls, moe_cls = OPS[kernels]
        cm = None if mesh is None else shd.compute_mesh(mesh)
        if attention_cls is PallasAttention:
            kw = dict(mesh=cm, rules=rules, impl=kernel_impl(device))
            attention, moe, dense = attention_cls(**kw), moe_cls(**kw), XlaDense()
        else:
            kw = dict(mesh=cm, rules=rules)
            cpu = device.platform == "cpu"  # XLA:CPU: the decode formulations of cpu_kernels
            attention = attention_cls()
            moe = moe_cls(**kw, cpu_decode=cpu, native=cpu and native.available())
            dense = XlaDense(cpu_rows=CPU_DENSE_ROWS if cpu else 0)
        return cls(attention=attention, moe=moe, mesh=mesh, rules=rules, dense=dense,
                   paged_attention=PAGED_OPS[kernels](**kw))

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


def _on_explicit_mesh(x) -> bool:
    """Whether x's type carries Explicit mesh axes (false inside an auto_axes region)."""
    mesh = jax.typeof(x).sharding.mesh
    return not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
