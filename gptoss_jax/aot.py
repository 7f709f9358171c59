"""Deviceless deployment plans: compile prefill and decode for a target from abstract shapes only.

`gptoss-jax aot --target {h100,tpu-v5e,tpu-v6e,tpu7x} [--devices N | --mesh data=A,expert=B,model=C]
--model {gpt-oss-20b,gpt-oss-120b,PATH} --batch B --max-len L [--json]`

No weights and no accelerator: the parameters and the KV cache are ShapeDtypeStructs carrying
NamedShardings (gptoss_jax.sharding rules) on a Mesh of *topology* devices
(`jax.experimental.topologies.get_topology_desc`: libtpu for TPUs, the JAX CUDA plugin with an H100
target config for GPUs), and the real jitted prefill / decode functions of gptoss_jax.generate are
lowered and compiled by XLA for that target. `compiled.memory_analysis()` gives the per-device bytes.

Needs the compile-only toolchains (`pip install -e .[aot]`) and, for the CUDA target, JAX_PLATFORMS
not requesting cuda (we set JAX_PLATFORMS=cpu when unset, which also skips the CUDA runtime check).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from .platforms import load_plugins

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_TARGET_CONFIG = os.path.join(os.path.dirname(REPO), "shared", "reference", "h100_target_config.txtpb")
GB = 1e9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" | "cuda"
    chip: str  # topology prefix ("v5e", ...) or GPU name
    device_memory_bytes: int  # per JAX device
    hbm_bandwidth: float  # bytes/s per JAX device
    devices_per_chip: int = 1


TARGETS = {
    "h100": Target("h100", "cuda", "H100", 80 * 10 ** 9, 3.35e12),  # memory replaced by the target config's
    "tpu-v5e": Target("tpu-v5e", "tpu", "v5e", 16 * GiB, 819e9),
    "tpu-v6e": Target("tpu-v6e", "tpu", "v6e", 32 * GiB, 1.64e12),
    # Ironwood: 192 GB HBM and 7.37 TB/s per chip; libtpu exposes its 2 TensorCores as 2 devices.
    "tpu7x": Target("tpu7x", "tpu", "tpu7x", 96 * 10 ** 9, 7.37e12 / 2, devices_per_chip=2),
}


def _setup_env():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never initialise a real backend
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's one-process lockfile
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if not jax.config.jax_platforms:  # jax imported before the env var was set: same effect
        jax.config.update("jax_platforms", "cpu")
    load_plugins()  # the CUDA plugin (the H100 topology) without its start-up noise


def h100_target_config(path: str | None = None) -> str:
    path = path or os.environ.get("GPTOSS_H100_TARGET_CONFIG", H100_TARGET_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"H100 target config not found at {path} (set GPTOSS_H100_TARGET_CONFIG)")
    with open(path) as f:
        return f.read()


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
    """n compile-only devices of the target (the first n of the smallest topology that has them)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        chips = -(-n // target.devices_per_chip)
        topo = topologies.get_topology_desc(_tpu_topology(target.chip, chips), "tpu")
    else:
        shape = f"1x1x{n}" if n <= 8 else f"1x{-(-n // 8)}x8"
        topo = topologies.get_topology_desc(platform="cuda", target_config=h100_target_config(), topology=shape)
    devices = list(topo.devices)
    if len(devices) < n:
        raise ValueError(f"topology for {target.name} has {len(devices)} devices, need {n}")
    return devices[:n]


def device_memory_bytes(target: Target) -> int:
    if target.platform == "cuda":
        import re

        m = re.search(r"device_memory_size:\s*(\d+)", h100_target_config())
        if m:
            return int(m.group(1))
    return target.device_memory_bytes


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
         prefill_chunk: int = 512, programs=("prefill", "decode"), kernels: str = "xla",
         max_seqs: int | None = None, kv_cache_gb: float | None = None) -> dict:
    """Compile prefill (one chunk of `prefill_chunk` tokens into a cache of `max_len`) and decode (one
    token per row) for the target; return the per-device memory plan and the decode roofline bound.
    `kernels="pallas"` compiles the Pallas MXFP4 and attention kernels (experts in kernel layout).
    `max_seqs`: also compile the serving engine's decode step over that many slots ("engine_decode"),
    its paged KV cache sized by `kv_cache_gb` per device (default: every slot can reach max_len);
    the plan's "paged_kv" says how many tokens fit per device."""
    _setup_env()
    from . import sharding as shd

    if target_name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target_name!r}")
    for name, v in (("batch", batch), ("max_len", max_len), ("prefill_chunk", prefill_chunk), ("devices", devices),
                    *((f"mesh {a}", k) for a, k in (mesh_shape or {}).items())):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    target = TARGETS[target_name]
    cfg = _load_cfg(model)
    if mesh_shape is None:
        mesh_shape = default_mesh_shape(devices or 1, cfg.num_local_experts)
    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in shd.AXES}
    n = math.prod(mesh_shape.values())
    if devices is not None and devices != n:
        raise ValueError(f"--devices {devices} but the mesh has {n} devices")
    t0 = time.perf_counter()
    mesh = shd.make_mesh(**mesh_shape, devices=topology_devices(target, n))
    out = dict(target=target_name, model=model)
    if max_seqs is not None and (isinstance(max_seqs, bool) or not isinstance(max_seqs, int) or max_seqs < 1):
        raise ValueError(f"max_seqs must be a positive integer, got {max_seqs!r}")
    if max_seqs is not None and "engine_decode" not in programs:
        programs = tuple(programs) + ("engine_decode",)
    if kv_cache_gb is not None and (max_seqs is None or isinstance(kv_cache_gb, bool)
                                    or not isinstance(kv_cache_gb, (int, float)) or not kv_cache_gb > 0):
        raise ValueError(f"kv_cache_gb sizes the engine's paged cache: a positive number with max_seqs, got "
                         f"{kv_cache_gb!r} (max_seqs {max_seqs!r})")
    out.update(plan_for_mesh(cfg, mesh, batch=batch, max_len=max_len, prefill_chunk=prefill_chunk,
                             programs=programs, kernels=kernels, max_seqs=max_seqs,
                             kv_cache_bytes=None if kv_cache_gb is None else int(kv_cache_gb * GB)))
    cap = device_memory_bytes(target)
    out.update(device_memory_bytes=cap, fits=bool(out["total_bytes_per_device"] <= cap))
    step = out["decode_bytes_per_step_per_device"]
    bound = target.hbm_bandwidth / step["total"]
    out.update(hbm_bandwidth=target.hbm_bandwidth, decode_steps_per_s_bound=bound,
               decode_tokens_per_s_bound=bound * batch, seconds=round(time.perf_counter() - t0, 1))
    return out


def plan_for_mesh(cfg, mesh, *, batch: int = 1, max_len: int = 8192, prefill_chunk: int = 512,
                  programs=("prefill", "decode"), kernels: str = "xla", rules=None,
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
    m = abstract_sharded_model(cfg, mesh, rules, kernels=kernels)
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
    out = dict(kernels=kernels, mesh={a: int(mesh.shape.get(a, 1)) for a in shd.AXES}, devices=int(mesh.size),
               batch=batch, max_len=max_len, prefill_chunk=chunk, device_kind=str(mesh.devices.flat[0].device_kind),
               programs={})
    for prog in programs:
        t = time.perf_counter()
        if prog == "prefill":
            lowered = prefill_step.lower(graphdef, state, sds((batch, chunk), jnp.int32, bspec2), cache,
                                         sds((batch,), jnp.int32, bspec1), sds((batch,), jnp.int32, bspec1))
        elif prog == "decode":
            s0 = jax.eval_shape(lambda: SamplingState.create(batch, temperature=0.0, top_p=1.0, top_k=None, seed=0,
                                                             stop_tokens=(0,), pad_id=0))
            s = jax.tree.map(lambda a: sds(a.shape, a.dtype, shd.batch_spec(batch, mesh, rules, a.ndim) if a.ndim
                                           and a.shape[0] == batch else jax.sharding.PartitionSpec()), s0)
            lowered = decode_step.lower(graphdef, state, cache, sds((batch,), jnp.int32, bspec1),
                                        sds((batch,), jnp.bool_, bspec1), s,
                                        sds((), jnp.int32, jax.sharding.PartitionSpec()))
        elif prog == "engine_decode":
            from .engine import lower_decode
            from .kv import PagedCache

            kv = PagedCache.create(m, batch if max_seqs is None else max_seqs, max_len, kv_cache_bytes=kv_cache_bytes)
            out["paged_kv"] = paged_kv_plan(kv, kv_cache_bytes)
            lowered = lower_decode(m, kv)
        else:
            raise ValueError(f"unknown program {prog!r}")
        compiled = lowered.compile()
        out["programs"][prog] = dict(_mem(compiled), compile_seconds=round(time.perf_counter() - t, 1))
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


def format_plan(p: dict) -> str:
    def g(b):
        return f"{b / GB:8.2f} GB"

    mesh = ", ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"gpt-oss plan: {p['model']} ({p.get('kernels', 'xla')} kernels) on {p['devices']} x {p['target']} "
             f"({p['device_kind']}), mesh {mesh}, "
             f"batch {p['batch']}, max_len {p['max_len']}, prefill chunk {p['prefill_chunk']}",
             f"{'program':<14}{'arguments':>14}{'temp':>14}{'output-alias':>16}{'total':>14}{'compile':>10}"]
    for name, q in p["programs"].items():
        lines.append(f"{name:<14}{g(q['argument_bytes']):>14}{g(q['temp_bytes']):>14}"
                     f"{g(q['output_bytes'] - q['alias_bytes']):>16}{g(q['total_bytes_per_device']):>14}"
                     f"{q['compile_seconds']:>9.1f}s")
    lines.append(f"per device: arguments (params + KV cache) {g(p['argument_bytes']).strip()}, temp "
                 f"{g(p['temp_bytes']).strip()}, total {g(p['total_bytes_per_device']).strip()} of "
                 f"{g(p['device_memory_bytes']).strip()} -> {'fits' if p['fits'] else 'DOES NOT FIT'}")
    if "paged_kv" in p:
        k = p["paged_kv"]
        budget = ("every slot at max_len" if k["kv_cache_bytes_per_device"] is None
                  else f"{k['kv_cache_bytes_per_device'] / GB:.2f} GB per device")
        lines.append(f"engine paged KV cache ({budget}): {k['pages_per_device']} pages of {k['page_size']} "
                     f"-> {k['tokens_per_device']} tokens per device ({k['max_len_sequences_per_device']} sequences "
                     f"of max_len {p['max_len']}; {k['slots_per_device']} slots per device)")
    s = p["decode_bytes_per_step_per_device"]
    lines.append(f"decode roofline bound: {s['total'] / GB:.2f} GB read per step per device "
                 f"(dense {s['dense'] / GB:.2f}, experts {s['experts'] / GB:.2f}, KV {s['kv_cache'] / GB:.2f}) "
                 f"at {p['hbm_bandwidth'] / 1e12:.2f} TB/s -> <= {p['decode_tokens_per_s_bound']:.0f} tokens/s "
                 f"(batch {p['batch']}; an upper bound, not a measurement)")
    return "\n".join(lines)


def main_args(args) -> int:
    from .sharding import parse_mesh

    mesh_shape = parse_mesh(args.mesh) if args.mesh else None
    p = plan(args.target, args.model, devices=args.devices, mesh_shape=mesh_shape, batch=args.batch,
             max_len=args.max_len, prefill_chunk=args.prefill_chunk, kernels=args.kernels,
             max_seqs=args.max_seqs, kv_cache_gb=args.kv_cache_gb)
    print(format_plan(p))
    if args.json:
        keys = ("argument_bytes", "temp_bytes", "total_bytes_per_device", "device_memory_bytes", "fits")
        print(json.dumps({**{k: p[k] for k in keys}, **{k: v for k, v in p.items() if k not in keys}}))
    return 0


def add_parser(sub):
    a = sub.add_parser("aot", help="compile prefill and decode for a target without hardware (deployment plan: "
                                   "memory per device, fits or not, decode roofline bound)")
    a.add_argument("--target", required=True, choices=sorted(TARGETS))
    g = a.add_mutually_exclusive_group()
    g.add_argument("--devices", type=int, default=None, help="device count (experts split over them when divisible)")
    g.add_argument("--mesh", default=None, help="data=A,expert=B,model=C (missing axes are 1)")
    a.add_argument("--model", default="gpt-oss-20b", help="gpt-oss-20b, gpt-oss-120b or a checkpoint folder/config")
    a.add_argument("--batch", type=int, default=1)
    a.add_argument("--max-len", type=int, default=8192)
    a.add_argument("--prefill-chunk", type=int, default=512)
    a.add_argument("--kernels", choices=["xla", "pallas"], default="xla",
                   help="MoE / attention implementation to compile (pallas: the MXFP4 and banded-attention kernels)")
    a.add_argument("--max-seqs", type=int, default=None,
                   help="also compile the serving engine's decode step over this many slots (gptoss_jax.Engine)")
    a.add_argument("--kv-cache-gb", type=float, default=None,
                   help="with --max-seqs: the engine's paged KV cache per device in GB (default: every slot can "
                        "reach --max-len); the plan reports the tokens that fit per device")
    a.add_argument("--json", action="store_true", help="last line: one JSON object")
    a.set_defaults(fn=main_args, compile_only=True)  # the CLI leaves the backend to _setup_env
    return a
