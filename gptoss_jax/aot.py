"""Deviceless deployment plans: compile the real programs for a target from abstract shapes only.

`gptoss-jax aot --target T [--devices N | --mesh data=A,expert=B,model=C] --model M [--json]`
    --program inference (default): prefill (one chunk into a cache of --max-len) and decode, batch
        --batch; --max-seqs also compiles the serving engine's decode step; --max-context also
        searches the largest context that fits.
    --program finetune: the training step (LoRA, or full fine-tuning of the dense weights with
        --lora-rank 0) on --batch-size x --seq-len tokens, --remat to recompute each block.
Targets: the GPUs of `pallas_kernels.gpu_targets` (h100, a100-80g, a100-40g, l4, t4: target
descriptions shipped in the package) and TPU chips (tpu-v5e, tpu-v6e, tpu7x; --devices 1 is one chip).

No weights and no accelerator: the parameters (and KV cache, optimizer state) are ShapeDtypeStructs
carrying NamedShardings (gptoss_jax.sharding rules) on a Mesh of *topology* devices
(`jax.experimental.topologies.get_topology_desc`: libtpu for TPUs, the JAX CUDA plugin with a GPU
target description), and the real jitted functions are lowered and compiled by XLA for that target.
`compiled.memory_analysis()` gives the per-device bytes. Kernels and compute dtype default to what
`load_model(kernels="auto", dtype="auto")` picks on that device (`runtime.resolve_kernels` /
`resolve_dtype`): the plan compiles what a real run there would run.

A plan fits when the largest program's bytes (arguments + outputs not aliased to them + temporaries +
code) stay within the device memory less the runtime's reserve: on GPUs what XLA's allocator leaves
out at XLA_PYTHON_CLIENT_MEM_FRACTION (the plan assumes --mem-fraction, default 0.95, which the
notebooks set; JAX's own default, 0.75, leaves a quarter of the GPU unused), on TPUs what the TPU
runtime keeps (device memory - the `bytes_limit` jax reports).

Needs the compile-only toolchains (`pip install gptoss-jax[aot]`) and, for the CUDA targets, JAX_PLATFORMS
not requesting cuda (we set JAX_PLATFORMS=cpu when unset, which also skips the CUDA runtime check).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from pallas_kernels import gpu_targets

from .platforms import load_plugins

GB = 1e9
GiB = 2 ** 30
GPU_MEM_FRACTION = 0.95  # XLA_PYTHON_CLIENT_MEM_FRACTION the plans assume (and the notebooks set)
CONTEXT_GRAIN = 256  # --max-context reports a multiple of this


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda"
    chip: str  # topology prefix ("v5e", ...) or the gpu_targets name
    tpu_memory_bytes: int = 0  # per JAX device (TPU; GPUs read theirs from the target description)
    tpu_bandwidth: float = 0.0  # bytes/s per JAX device (TPU)
    tpu_bytes_limit: int = 0  # what the TPU runtime lets jax allocate per device (memory_stats bytes_limit)
    devices_per_chip: int = 1

    def device_memory_bytes(self) -> int:
        if self.platform == "cuda":
            return int(gpu_targets.device_info(self.chip)["device_memory_size"])
        return self.tpu_memory_bytes

    def hbm_bandwidth(self) -> float:
        if self.platform == "cuda":
            return float(gpu_targets.device_info(self.chip)["memory_bandwidth"])
        return self.tpu_bandwidth

    def runtime_reserve_bytes(self, mem_fraction: float = GPU_MEM_FRACTION) -> int:
        """Device memory a run cannot use for its buffers: on GPUs what the XLA allocator leaves out at
        `mem_fraction` (for the CUDA context, cuBLAS / cuDNN handles, NCCL), on TPUs what the runtime keeps."""
        if self.platform == "cuda":
            return int(round(self.device_memory_bytes() * (1 - mem_fraction)))
        return self.tpu_memory_bytes - self.tpu_bytes_limit


TARGETS = {
    **{name: Target(name, "cuda", name) for name in gpu_targets.TARGETS},
    # v5e: 16 GiB HBM2e, 819 GB/s per chip; jax reports bytes_limit 16909332480 on a 16 GiB chip.
    "tpu-v5e": Target("tpu-v5e", "tpu", "v5e", 16 * GiB, 819e9, 16909332480),
    # v6e (Trillium): 32 GiB HBM, 1640 GB/s per chip; bytes_limit 33550237696 as jax reports it
    # (vllm-project/vllm#16211's v6e usage log).
    "tpu-v6e": Target("tpu-v6e", "tpu", "v6e", 32 * GiB, 1.64e12, 33550237696),
    # Ironwood: 192 GB HBM and 7.37 TB/s per chip; libtpu exposes its 2 TensorCores as 2 devices. Its
    # runtime reserve is not published: taken as v6e's (about 0.8 GB).
    "tpu7x": Target("tpu7x", "tpu", "tpu7x", 96 * 10 ** 9, 7.37e12 / 2, 96 * 10 ** 9 - 809500672,
                    devices_per_chip=2),
}


def _setup_env():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never initialise a real backend
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's one-process lockfile
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if not jax.config.jax_platforms:  # jax imported before the env var was set: same effect
        jax.config.update("jax_platforms", "cpu")
    load_plugins()  # the CUDA plugin (the GPU topologies) without its start-up noise


def _tpu_topology(chip: str, chips: int) -> str:
    if chip == "tpu7x":
        for name, n in (("2x2x1", 4), ("2x2x2", 8), ("2x2x4", 16), ("2x4x4", 32), ("4x4x4", 64)):
            if n >= chips:
                return f"tpu7x:{name}"
    else:
        for name, n in (("2x2", 4), ("2x4", 8), ("4x4", 16), ("4x8", 32), ("8x8", 64), ("8x16", 128),
                        ("16x16", 256)):
            if n >= chips:
                return f"{chip}:{name}"
    raise ValueError(f"no {chip} topology with {chips} chips known here")


def topology_devices(target: Target, n: int):
    """n compile-only devices of the target (the first n of the smallest topology that has them; one
    v5e / v6e chip is a single-chip host, as Colab's v5e-1 / v6e-1 runtimes)."""
    if target.platform == "cuda":
        return gpu_targets.topology_devices(target.chip, n)
    from jax.experimental import topologies

    chips = -(-n // target.devices_per_chip)
    if chips == 1 and target.devices_per_chip == 1:
        topo = topologies.get_topology_desc(f"{target.chip}:1x1", "tpu", chips_per_host_bounds=(1, 1, 1))
    else:
        topo = topologies.get_topology_desc(_tpu_topology(target.chip, chips), "tpu")
    devices = list(topo.devices)
    if len(devices) < n:
        raise ValueError(f"topology for {target.name} has {len(devices)} devices, need {n}")
    return devices[:n]


def default_mesh_shape(n: int, num_experts: int) -> dict[str, int]:
    """--devices N: experts over all N devices when they divide the expert count, else heads."""
    if num_experts % n == 0:
        return {"data": 1, "expert": n, "model": 1}
    return {"data": 1, "expert": 1, "model": n}


def _load_cfg(model: str):
    from .config import config_for

    return config_for(model)


def abstract_sharded_model(cfg, mesh, rules=None, dtype="bfloat16", kernels="xla"):
    """The model with ShapeDtypeStruct leaves carrying their NamedShardings, built on a Runtime
    for `mesh` (experts in kernel layout for kernels="pallas")."""
    import jax

    from .model import abstract_model
    from .params import assemble, param_leaves
    from .runtime import Runtime

    runtime = Runtime.create(kernels, mesh, rules)
    abstract = abstract_model(cfg, dtype=dtype, runtime=runtime, kernel_layout=runtime.moe.kernel_layout)
    sh = runtime.param_shardings(abstract)
    sds = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh[p]) for p, v in param_leaves(abstract).items()}
    return assemble(abstract, sds)


def _check_positive(**values):
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _target_mesh(target_name: str, model: str, devices: int | None, mesh_shape: dict[str, int] | None):
    """(Target, config, Mesh of its compile-only devices) for a plan."""
    from . import sharding as shd

    if target_name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target_name!r}")
    _check_positive(devices=devices, **{f"mesh {a}": k for a, k in (mesh_shape or {}).items()})
    target = TARGETS[target_name]
    cfg = _load_cfg(model)
    if mesh_shape is None:
        mesh_shape = default_mesh_shape(devices or 1, cfg.num_local_experts)
    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in shd.AXES}
    n = math.prod(mesh_shape.values())
    if devices is not None and devices != n:
        raise ValueError(f"--devices {devices} but the mesh has {n} devices")
    return target, cfg, shd.make_mesh(**mesh_shape, devices=topology_devices(target, n))


def _choices(kernels: str, dtype: str, mesh) -> tuple[str, str]:
    """kernels and compute dtype as `load_model` resolves them on the mesh's devices."""
    from .runtime import resolve_dtype, resolve_kernels, target_device

    device = target_device(mesh)
    return resolve_kernels(kernels, device), resolve_dtype(dtype, device)


def _fit(target: Target, total: int, mem_fraction: float) -> dict:
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"mem_fraction must be in (0, 1], got {mem_fraction!r}")
    cap = target.device_memory_bytes()
    reserve = target.runtime_reserve_bytes(mem_fraction)
    out = dict(device_memory_bytes=cap, runtime_reserve_bytes=reserve, usable_bytes=cap - reserve,
               fits=bool(total <= cap - reserve))
    if target.platform == "cuda":
        out["gpu_mem_fraction"] = mem_fraction
    return out


def _program(lowered, args, t0: float) -> dict:
    """Compile `lowered` (whose arguments are the ShapeDtypeStructs `args`); the program's record:
    memory (`_mem`), the custom calls it runs (the kernels: Triton, Mosaic, cuBLAS), the compile time.
    A compiler that refuses a program larger than the device (the TPU compiler does) gives a record
    of the arguments and the temporaries it reports, with `compile_error`: the plan does not fit."""
    import re

    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError, whose message says why
        msg = " ".join(str(e).split())
        need = re.search(r"HLO temporaries \(([\d.]+)([KMG])\)", msg)
        if "RESOURCE_EXHAUSTED" not in msg or need is None:
            raise
        temp = int(float(need.group(1)) * 2 ** (10 * "KMG".index(need.group(2)) + 10))
        arg = sum(_shard_bytes(a.shape, a.dtype.itemsize, a.sharding) for a in _leaves(args))
        return dict(argument_bytes=arg, output_bytes=0, alias_bytes=0, temp_bytes=temp, code_bytes=0,
                    total_bytes_per_device=arg + temp, custom_calls=[], compile_error=msg[:300],
                    compile_seconds=round(time.perf_counter() - t0, 1))
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text() or "")))
    return dict(_mem(compiled), custom_calls=calls, compile_seconds=round(time.perf_counter() - t0, 1))


def _leaves(tree):
    import jax

    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)]


def _mem(compiled) -> dict:
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    return dict(argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
                total_bytes_per_device=arg + out - alias + temp + code)


def _shard_bytes(shape, dtype_size, sharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * dtype_size


def decode_bytes_per_step(cfg, model, cache, mesh, batch: int, context: int) -> dict:
    """Bytes one device reads per decode step at `context` tokens (the roofline numerator):
    dense parameters of its shards (embedding: only B rows), the routed experts of its expert slice
    (min(E, B*k) distinct experts per layer, spread evenly over the expert axis: optimistic), and its
    slice of the KV cache up to `context` (sliding layers: their window)."""
    import numpy as np

    from .params import param_leaves
    from .layers import CHECKPOINT_EXPERT_WEIGHTS, KERNEL_EXPERT_WEIGHTS

    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    n_e = mesh.shape.get("expert", 1)
    dense = expert_layer = 0
    for p, leaf in param_leaves(model).items():
        size = np.dtype(leaf.dtype).itemsize
        if p[-1] in CHECKPOINT_EXPERT_WEIGHTS + KERNEL_EXPERT_WEIGHTS + ("b1", "b2"):
            if p[1] == 0:
                expert_layer += math.prod(leaf.shape[1:]) * size  # one expert, all its tensors
        elif p[-1] == "embed_VD":
            dense += batch * leaf.shape[1] * size
        else:
            dense += _shard_bytes(leaf.shape, size, leaf.sharding)
    experts = cfg.num_hidden_layers * expert_layer * min(E, batch * k) / n_e
    kv = 0
    for a in cache.k + cache.v:
        shard = a.sharding.shard_shape(a.shape)
        kv += math.prod(shard) // a.shape[1] * min(a.shape[1], context) * np.dtype(a.dtype).itemsize
    return dict(dense=int(dense), experts=int(experts), kv_cache=int(kv), total=int(dense + experts + kv))


def plan(target_name: str, model: str = "gpt-oss-20b", *, devices: int | None = None,
         mesh_shape: dict[str, int] | None = None, batch: int = 1, max_len: int = 8192,
         prefill_chunk: int = 512, programs=("prefill", "decode"), kernels: str = "auto", dtype: str = "auto",
         max_seqs: int | None = None, kv_cache_gb: float | None = None, mem_fraction: float = GPU_MEM_FRACTION,
         max_context: bool = False) -> dict:
    """Compile prefill (one chunk of `prefill_chunk` tokens into a cache of `max_len`) and decode (one
    token per row) for the target; return the per-device memory plan, the fit and the decode roofline
    bound. `kernels` / `dtype`: "auto" resolves as `load_model` would on the target ("pallas":
    the Pallas MXFP4 and attention kernels, experts in kernel layout). `max_seqs`: also compile the
    serving engine's decode step over that many slots ("engine_decode"), its paged KV cache sized by
    `kv_cache_gb` per device (default: every slot can reach max_len); the plan's "paged_kv" says how
    many tokens fit per device. `max_context`: also find the largest `max_len` that fits
    (`largest_context`: two more compiles, three at most)."""
    _setup_env()
    _check_positive(batch=batch, max_len=max_len, prefill_chunk=prefill_chunk, max_seqs=max_seqs)
    t0 = time.perf_counter()
    target, cfg, mesh = _target_mesh(target_name, model, devices, mesh_shape)
    kernels, dtype = _choices(kernels, dtype, mesh)
    if max_seqs is not None and "engine_decode" not in programs:
        programs = tuple(programs) + ("engine_decode",)
    if kv_cache_gb is not None and (max_seqs is None or isinstance(kv_cache_gb, bool)
                                    or not isinstance(kv_cache_gb, (int, float)) or not kv_cache_gb > 0):
        raise ValueError(f"kv_cache_gb sizes the engine's paged cache: a positive number with max_seqs, got "
                         f"{kv_cache_gb!r} (max_seqs {max_seqs!r})")
    kw = dict(batch=batch, prefill_chunk=prefill_chunk, programs=programs, kernels=kernels, dtype=dtype,
              max_seqs=max_seqs, kv_cache_bytes=None if kv_cache_gb is None else int(kv_cache_gb * GB))
    out = dict(program="inference", target=target_name, model=model)
    out.update(plan_for_mesh(cfg, mesh, max_len=max_len, **kw))
    out.update(_fit(target, out["total_bytes_per_device"], mem_fraction))
    step = out["decode_bytes_per_step_per_device"]
    bound = target.hbm_bandwidth() / step["total"]
    out.update(hbm_bandwidth=target.hbm_bandwidth(), decode_steps_per_s_bound=bound,
               decode_tokens_per_s_bound=bound * batch)
    if max_context:
        out["max_context"] = largest_context(cfg, mesh, out, out["usable_bytes"], **kw)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def largest_context(cfg, mesh, base: dict, usable: int, **kw) -> dict:
    """The largest `max_len` (a multiple of CONTEXT_GRAIN, at most the model's context) whose plan was
    compiled and fits in `usable` bytes. Each program's memory grows linearly with the context (the
    KV cache of the full-attention layers; on the XLA path also the attention scores of a prefill
    chunk over the cache), at its own rate: the plan's total is the largest of them. A second compile
    gives each program's rate; the context where the first program reaches `usable` is compiled to
    check it, and refined from the two nearest compiled points (at most three checks). A context the
    compiler refuses for another memory (a kernel's on-chip scratch) counts as not fitting; the search
    then halves the interval above the largest fitting context."""
    limit = cfg.max_position_embeddings
    points = {base["max_len"]: _totals(base)}  # context -> {program: total bytes}
    failed = {}  # context -> the compiler's reason
    L0 = base["max_len"]
    L1 = L0 // 2 if L0 >= 2 * CONTEXT_GRAIN else 2 * L0

    def compile_at(L):
        try:
            points[L] = _totals(plan_for_mesh(cfg, mesh, max_len=L, **kw))
        except Exception as e:  # jax.errors.JaxRuntimeError
            msg = " ".join(str(e).split())
            if "RESOURCE_EXHAUSTED" not in msg:
                raise
            failed[L] = msg[:300]

    compile_at(L1)
    rate = {}
    for _ in range(3):
        fit = sorted(L for L, t in points.items() if max(t.values()) <= usable)
        over = sorted(L for L in points if L not in fit)
        lo = fit[-1] if fit else 0
        hi = min(over + sorted(failed), default=None)
        if fit and over:  # interpolate between the largest fitting and the smallest failing context
            a, b = fit[-1], over[0]
        elif len(fit) >= 2 or len(over) >= 2:  # extrapolate from two fitting (or two failing) contexts
            a, b = (fit[-2], fit[-1]) if len(fit) >= 2 else (over[0], over[1])
        else:
            break
        rate = {p: (points[b][p] - points[a][p]) / (b - a) for p in points[a]}
        # each program's context at `usable`; a program that does not grow never binds
        reach = [(usable - points[a][p]) / r + a for p, r in rate.items() if r > 0]
        L = min([limit, *(int(x) // CONTEXT_GRAIN * CONTEXT_GRAIN for x in reach)])
        if hi is not None and hi in failed:  # refused, not over: no rate says where; bisect
            L = min(L, (lo + hi) // 2 // CONTEXT_GRAIN * CONTEXT_GRAIN)
        if hi is not None:
            L = min(L, hi - CONTEXT_GRAIN)
        if L <= lo or L < CONTEXT_GRAIN or L in points:
            break
        compile_at(L)
    fit = sorted(L for L, t in points.items() if max(t.values()) <= usable)
    out = dict(bytes_per_token=int(round(max(rate.values(), default=0.0))), compiles=len(points) + len(failed))
    if failed:
        out["refused"] = {str(L): why for L, why in sorted(failed.items())}
    if not fit:
        smallest = min(points)
        return dict(out, max_len=0, note=f"even {smallest} tokens do not fit: "
                                         f"{max(points[smallest].values()) / GB:.2f} GB > usable {usable / GB:.2f} GB")
    note = {} if not failed else {"note": f"the compiler refused {min(failed)} tokens ({failed[min(failed)][:120]})"}
    return dict(out, max_len=fit[-1], total_bytes_per_device=max(points[fit[-1]].values()), **note)


def _totals(plan: dict) -> dict:
    return {name: q["total_bytes_per_device"] for name, q in plan["programs"].items()}


def plan_for_mesh(cfg, mesh, *, batch: int = 1, max_len: int = 8192, prefill_chunk: int = 512,
                  programs=("prefill", "decode"), kernels: str = "xla", dtype: str = "bfloat16", rules=None,
                  max_seqs: int | None = None, kv_cache_bytes: int | None = None) -> dict:
    """Lower and compile prefill / decode for `mesh` (any jax Mesh: topology devices for deviceless
    plans, or real ones); per-program memory, the largest per-device total, and the bytes one
    decode step reads per device. "engine_decode": the serving engine's step over `max_seqs` slots
    (default `batch`) of `max_len` positions, its paged cache `kv_cache_bytes` per device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from . import sharding as shd
    from .generate import SamplingState, decode_step, prefill_step
    from .model import KVCache

    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds the model's context {cfg.max_position_embeddings}")
    rules = shd.DEFAULT_RULES if rules is None else rules
    m = abstract_sharded_model(cfg, mesh, rules, dtype=dtype, kernels=kernels)
    graphdef, state = nnx.split(m)
    NS = jax.sharding.NamedSharding

    def sds(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NS(mesh, spec))

    cache0 = jax.eval_shape(lambda: KVCache.init(cfg, batch, max_len, m.dtype))
    cspecs = shd.cache_specs(cache0, mesh, rules)
    cache = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), cache0, cspecs)
    bspec1 = shd.batch_spec(batch, mesh, rules, 1)
    bspec2 = shd.batch_spec(batch, mesh, rules, 2)
    chunk = min(prefill_chunk, max_len)
    out = dict(kernels=kernels, dtype=str(m.dtype), mesh={a: int(mesh.shape.get(a, 1)) for a in shd.AXES}, devices=int(mesh.size),
               batch=batch, max_len=max_len, prefill_chunk=chunk, device_kind=str(mesh.devices.flat[0].device_kind),
               programs={})
    for prog in programs:
        t = time.perf_counter()
        if prog == "prefill":
            args = (state, sds((batch, chunk), jnp.int32, bspec2), cache, sds((batch,), jnp.int32, bspec1),
                    sds((batch,), jnp.int32, bspec1))
            lowered = prefill_step.lower(graphdef, *args)
        elif prog == "decode":
            s0 = jax.eval_shape(lambda: SamplingState.create(batch, temperature=0.0, top_p=1.0, top_k=None, seed=0,
                                                             stop_tokens=(0,), pad_id=0))
            s = jax.tree.map(lambda a: sds(a.shape, a.dtype, shd.batch_spec(batch, mesh, rules, a.ndim) if a.ndim
                                           and a.shape[0] == batch else jax.sharding.PartitionSpec()), s0)
            args = (state, cache, sds((batch,), jnp.int32, bspec1), sds((batch,), jnp.bool_, bspec1), s,
                    sds((), jnp.int32, jax.sharding.PartitionSpec()))
            lowered = decode_step.lower(graphdef, *args)
        elif prog == "engine_decode":
            from .engine import lower_decode
            from .kv import PagedCache

            kv = PagedCache.create(m, batch if max_seqs is None else max_seqs, max_len, kv_cache_bytes=kv_cache_bytes)
            out["paged_kv"] = paged_kv_plan(kv, kv_cache_bytes)
            args = (state,)  # and the pages and slot state, not counted should the compiler refuse it
            lowered = lower_decode(m, kv)
        else:
            raise ValueError(f"unknown program {prog!r}")
        out["programs"][prog] = _program(lowered, args, t)
    progs = out["programs"].values()
    out.update(argument_bytes=max(p["argument_bytes"] for p in progs), temp_bytes=max(p["temp_bytes"] for p in progs),
               total_bytes_per_device=max(p["total_bytes_per_device"] for p in progs),
               decode_bytes_per_step_per_device=decode_bytes_per_step(cfg, m, cache, mesh, batch, max_len))
    return out


def paged_kv_plan(kv, kv_cache_bytes: int | None) -> dict:
    """What the engine's paged cache holds per device: pages, tokens, max_len sequences."""
    L = kv.layout
    tokens = kv.tokens_per_device()
    return dict(kv_cache_bytes_per_device=kv_cache_bytes, page_size=L.page_size, pages_per_device=L.pages_per_shard,
                tokens_per_device=tokens, max_len_sequences_per_device=tokens // kv.max_len,
                slots_per_device=kv.max_seqs // L.n_shards)


def plan_finetune(target_name: str, model: str = "gpt-oss-20b", *, devices: int | None = None,
                  mesh_shape: dict[str, int] | None = None, batch_size: int = 1, seq_len: int = 1024,
                  lora_rank: int = 8, remat: bool = False, kernels: str = "auto", dtype: str = "auto",
                  mem_fraction: float = GPU_MEM_FRACTION) -> dict:
    """Compile one fine-tuning step (`finetune.train_step`: LoRA of rank `lora_rank`, or full
    fine-tuning of the dense weights with 0) on `batch_size` x `seq_len` tokens for the target;
    return the per-device memory plan and the fit. The batch is split over the mesh's data axis."""
    from .finetune import FinetuneConfig

    _setup_env()
    t0 = time.perf_counter()
    target, cfg, mesh = _target_mesh(target_name, model, devices, mesh_shape)
    kernels, dtype = _choices(kernels, dtype, mesh)
    fcfg = FinetuneConfig(steps=1, batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, remat=remat)
    out = dict(program="finetune", target=target_name, model=model)
    out.update(finetune_plan_for_mesh(cfg, mesh, fcfg, kernels=kernels, dtype=dtype))
    out.update(_fit(target, out["total_bytes_per_device"], mem_fraction))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def finetune_plan_for_mesh(cfg, mesh, fcfg, *, kernels: str = "xla", dtype: str = "bfloat16", rules=None) -> dict:
    """Lower and compile `finetune.train_step` for `mesh` from abstract shapes: the model, its
    adapters (or float32 master weights) and the AdamW state as the Trainer holds them (base weights
    on the sharding rules, adapters replicated, moments like their parameters), a [B, L] batch over
    data; the step returns the loss, the new trainable weights and optimizer state (not donated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from . import sharding as shd
    from .finetune import make_trainable, train_step
    from .model import GptOss, param_dtype_for
    from .params import param_leaves, param_path
    from .runtime import Runtime

    rules = shd.DEFAULT_RULES if rules is None else rules
    if "data" in mesh.shape and fcfg.batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {fcfg.batch_size} is not a multiple of the data axis ({mesh.shape['data']})")
    runtime = Runtime.create(kernels, mesh, rules)
    trains = []

    def build():
        m = GptOss(cfg, runtime=runtime, dtype=dtype, param_dtype=param_dtype_for(dtype), rngs=nnx.Rngs(0))
        if runtime.moe.kernel_layout:
            m.to_kernel_layout(assume_normal_scales=True)
        trains.append(make_trainable(m, fcfg))
        return m, nnx.Optimizer(m, fcfg.optimizer(), wrt=trains[0])

    pair = nnx.eval_shape(build)
    wrt = trains[0]
    model_sh, model_leaves = runtime.param_shardings(pair[0]), param_leaves(pair[0])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharding_of(path, leaf):
        """A model parameter's own sharding; an optimizer moment that of its parameter (its path ends
        with the parameter's, same shape); anything else (the step count) replicated."""
        for i in range(len(path)):
            if path[i:] in model_sh and model_leaves[path[i:]].shape == leaf.shape:
                return model_sh[path[i:]]
        return replicated

    graphdef, state = nnx.split(pair)
    flat = []
    for key, var in nnx.to_flat_state(state):
        leaf = var.get_value() if hasattr(var, "get_value") else var.value
        path = param_path(key)[1:]  # drop the pair index
        flat.append((key, var.replace(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_of(path, leaf)))))
    state = nnx.from_flat_state(flat)
    B, L = fcfg.batch_size, fcfg.seq_len
    batch_sh = jax.sharding.NamedSharding(mesh, shd.batch_spec(B, mesh, rules, 2))
    ids = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=batch_sh)
    mask = jax.ShapeDtypeStruct((B, L), jnp.bool_, sharding=batch_sh)

    def step(state, ids, mask):
        m, opt = nnx.merge(graphdef, state)
        loss = train_step(m, opt, ids, mask, wrt, fcfg.remat)
        return loss, nnx.state(m, wrt), nnx.state(opt)

    t = time.perf_counter()
    prog = _program(jax.jit(step).lower(state, ids, mask), (state, ids, mask), t)
    n_train = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(pair[0], wrt)))
    return dict(kernels=kernels, dtype=str(jnp.dtype(dtype)), mesh={a: int(mesh.shape.get(a, 1)) for a in shd.AXES},
                devices=int(mesh.size), device_kind=str(mesh.devices.flat[0].device_kind),
                batch_size=B, seq_len=L, lora_rank=fcfg.lora_rank, remat=fcfg.remat, trainable_parameters=int(n_train),
                programs={"train_step": prog}, argument_bytes=prog["argument_bytes"], temp_bytes=prog["temp_bytes"],
                total_bytes_per_device=prog["total_bytes_per_device"])


def format_plan(p: dict) -> str:
    def g(b):
        return f"{b / GB:.2f} GB"

    mesh = ", ".join(f"{k}={v}" for k, v in p["mesh"].items())
    if p["program"] == "finetune":
        what = (f"fine-tuning step ({'LoRA rank ' + str(p['lora_rank']) if p['lora_rank'] else 'full, dense weights'}"
                f"{', remat' if p['remat'] else ''}; {p['trainable_parameters'] / 1e6:.1f} M trainable), "
                f"batch {p['batch_size']} x seq {p['seq_len']}")
    else:
        what = f"batch {p['batch']}, max_len {p['max_len']}, prefill chunk {p['prefill_chunk']}"
    lines = [f"gpt-oss plan: {p['model']} ({p['kernels']} kernels, {p['dtype']}) on {p['devices']} x {p['target']} "
             f"({p['device_kind']}), mesh {mesh}, {what}",
             f"{'program':<14}{'arguments':>12}{'temp':>12}{'output-alias':>14}{'total':>12}{'compile':>10}"]
    for name, q in p["programs"].items():
        lines.append(f"{name:<14}{g(q['argument_bytes']):>12}{g(q['temp_bytes']):>12}"
                     f"{g(q['output_bytes'] - q['alias_bytes']):>14}{g(q['total_bytes_per_device']):>12}"
                     f"{q['compile_seconds']:>9.1f}s")
        if "compile_error" in q:
            lines.append(f"  {name}: the compiler refused it (larger than the device): {q['compile_error'][:160]}")
    reserve = (f"XLA_PYTHON_CLIENT_MEM_FRACTION={p['gpu_mem_fraction']}" if "gpu_mem_fraction" in p
               else "the TPU runtime's")
    lines.append(f"per device: total {g(p['total_bytes_per_device'])} of {g(p['usable_bytes'])} usable "
                 f"({g(p['device_memory_bytes'])} less {g(p['runtime_reserve_bytes'])} reserve, {reserve}) -> "
                 f"{'fits' if p['fits'] else 'DOES NOT FIT'}")
    if "decode_bytes_per_step_per_device" in p:
        s = p["decode_bytes_per_step_per_device"]
        lines.append(f"decode roofline bound: {s['total'] / GB:.2f} GB read per step per device "
                     f"(dense {s['dense'] / GB:.2f}, experts {s['experts'] / GB:.2f}, KV {s['kv_cache'] / GB:.2f}) "
                     f"at {p['hbm_bandwidth'] / 1e12:.2f} TB/s -> <= {p['decode_tokens_per_s_bound']:.0f} tokens/s "
                     f"(batch {p['batch']}; an upper bound, not a measurement)")
    mc = p.get("max_context")
    if mc is not None:
        lines.append(f"largest context that fits: {mc['max_len']} tokens (up to {mc['bytes_per_token'] / 1e3:.1f} KB "
                     f"per token of context; {mc['compiles']} plans compiled){'; ' + mc['note'] if mc.get('note') else ''}")
    if "paged_kv" in p:
        k = p["paged_kv"]
        budget = ("every slot at max_len" if k["kv_cache_bytes_per_device"] is None
                  else f"{k['kv_cache_bytes_per_device'] / GB:.2f} GB per device")
        lines.append(f"engine paged KV cache ({budget}): {k['pages_per_device']} pages of {k['page_size']} "
                     f"-> {k['tokens_per_device']} tokens per device ({k['max_len_sequences_per_device']} sequences "
                     f"of max_len {p['max_len']}; {k['slots_per_device']} slots per device)")
    return "\n".join(lines)


def main_args(args) -> int:
    from .sharding import parse_mesh

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    common = dict(devices=args.devices, mesh_shape=mesh_shape, kernels=args.kernels, dtype=args.dtype,
                  mem_fraction=args.mem_fraction)
    if args.program == "finetune":
        p = plan_finetune(args.target, args.model, batch_size=args.batch, seq_len=args.seq_len,
                          lora_rank=args.lora_rank, remat=args.remat, **common)
    else:
        p = plan(args.target, args.model, batch=args.batch, max_len=args.max_len, prefill_chunk=args.prefill_chunk,
                 max_seqs=args.max_seqs, kv_cache_gb=args.kv_cache_gb, max_context=args.max_context, **common)
    print(format_plan(p))
    if args.json:
        keys = ("argument_bytes", "temp_bytes", "total_bytes_per_device", "device_memory_bytes", "fits")
        print(json.dumps({**{k: p[k] for k in keys}, **{k: v for k, v in p.items() if k not in keys}}))
    return 0


def add_parser(sub):
    from .runtime import DTYPE_CHOICES, KERNEL_CHOICES

    a = sub.add_parser("aot", help="compile inference or a fine-tuning step for a target without hardware "
                                   "(deployment plan: memory per device, fits or not, decode roofline bound)")
    a.add_argument("--target", required=True, choices=sorted(TARGETS))
    g = a.add_mutually_exclusive_group()
    g.add_argument("--devices", type=int, default=None, help="device count (experts split over them when divisible)")
    g.add_argument("--mesh", default=None, help="data=A,expert=B,model=C (missing axes are 1)")
    a.add_argument("--model", default="gpt-oss-20b", help="gpt-oss-20b, gpt-oss-120b or a checkpoint folder/config")
    a.add_argument("--program", choices=["inference", "finetune"], default="inference",
                   help="inference: prefill + decode (default); finetune: one training step")
    a.add_argument("--batch", "--batch-size", dest="batch", type=int, default=1, help="rows (sequences)")
    a.add_argument("--max-len", type=int, default=8192, help="inference: context (KV cache positions)")
    a.add_argument("--prefill-chunk", type=int, default=512, help="inference: prompt tokens per prefill step")
    a.add_argument("--max-seqs", type=int, default=None,
                   help="inference: also compile the serving engine's decode step over this many slots "
                        "(gptoss_jax.Engine)")
    a.add_argument("--kv-cache-gb", type=float, default=None,
                   help="with --max-seqs: the engine's paged KV cache per device in GB (default: every slot can "
                        "reach --max-len); the plan reports the tokens that fit per device")
    a.add_argument("--max-context", action="store_true",
                   help="inference: also find the largest --max-len that fits (two to four more compiles)")
    a.add_argument("--seq-len", type=int, default=1024, help="finetune: tokens per training example")
    a.add_argument("--lora-rank", type=int, default=8, help="finetune: LoRA rank; 0 = full fine-tuning of the "
                                                            "dense weights")
    a.add_argument("--remat", action="store_true", help="finetune: recompute each block in the backward pass")
    a.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="auto (default): what load_model picks on the target; pallas: the MXFP4 and "
                        "banded-attention kernels; xla")
    a.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype; auto (default): what the target runs natively (float16 on T4)")
    a.add_argument("--mem-fraction", type=float, default=GPU_MEM_FRACTION,
                   help=f"GPU targets: the XLA_PYTHON_CLIENT_MEM_FRACTION a run sets (default {GPU_MEM_FRACTION})")
    a.add_argument("--json", action="store_true", help="last line: one JSON object")
    a.set_defaults(fn=main_args, compile_only=True)  # the CLI leaves the backend to _setup_env
    return a
