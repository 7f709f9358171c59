"""Checkpoint IO: the released layouts (Hugging Face safetensors, OpenAI `original/`), our orbax
format, random checkpoints in the exact released layout, and Hub downloads.

One table (`tensor_specs`) names every tensor of a layout with its shape, dtype and the map to and
from our parameters; reading, validating, writing and exporting all use it.
Safetensors are read through a memory map, tensor by tensor, so host memory stays near the largest
tensor; every write goes to a temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import mmap
import os
import shutil
import struct
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from . import mxfp4
from .config import GptOssConfig, load_config

ORBAX_MARKER = "gptoss_jax.json"
ORBAX_FORMAT = "gptoss-jax-orbax-v1"
HF_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["model-*.safetensors", "model.safetensors", HF_INDEX, "config.json", "generation_config.json"]

ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16, "U8": np.uint8,
             "I8": np.int8, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_, "F64": np.float64}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: names the tensor and the file."""


# ---------------------------------------------------------------------------------------------
# Safetensors, read and written by hand: lazy per-tensor reads, exact truncation checks, bf16
# ---------------------------------------------------------------------------------------------
class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header "
                                      f"(header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, t) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
            if dtype not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize
            if t - b != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} spans {t - b} bytes but "
                                      f"{dtype}{list(shape)} needs {nbytes}")
            if self.data_start + t > size:
                raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self.data_start + t} but the file has {size} bytes")
            self.entries[name] = (dtype, shape, b, t)
        self._mm = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of one tensor."""
        dtype, shape, b, t = self.entries[name]
        return np.frombuffer(self._map(), dtype=ST_DTYPES[dtype], count=math.prod(shape),
                             offset=self.data_start + b).reshape(shape)

    def release(self, name: str):
        """Drop the tensor's pages from this process's resident memory (they re-read from the file
        if touched again), so streaming a checkpoint keeps host memory near one tensor."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, b, t = self.entries[name]
        start = (self.data_start + b) // mmap.PAGESIZE * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, self.data_start + t - start)

    def close(self):
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None):
    """Streamed writer: (name, shape, dtype name, producer) -> file; one tensor in memory at a time.
    A producer returning None leaves that tensor as a hole of zeros (sparse file)."""
    tensors = list(tensors)
    header, off = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            arr = produce()
            if arr is None:  # all zeros: leave a hole (sparse file)
                f.seek(math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize, os.SEEK_CUR)
                continue
            arr = np.ascontiguousarray(arr, dtype=ST_DTYPES[dtype])
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {arr.shape}, expected {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        f.truncate(f.tell())


# ---------------------------------------------------------------------------------------------
# The layout table
# ---------------------------------------------------------------------------------------------
ParamPath = tuple  # e.g. ("blocks", 3, "attn", "wq_DNH")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    params: tuple[ParamPath, ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # file tensor -> our params
    from_params: Callable[..., np.ndarray]  # our params -> file tensor
    kind: str = "dense"  # dense | norm | bias | sink | router | blocks | scales


def _ident(x):
    return (x,)


def _ident_back(x):
    return x


def tensor_specs(cfg: GptOssConfig, layout: str = "hf") -> list[TensorSpec]:
    """Every tensor of the released checkpoint for `cfg`, in release order."""
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, F, V = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    gd, gf, nb = D // mxfp4.BLOCK, F // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK
    bf = "BF16"

    def S(name, shape, params, to=_ident, back=_ident_back, dtype=bf, kind="dense"):
        return TensorSpec(name, tuple(shape), dtype, tuple(params), to, back, kind)

    # [out = heads*H, D] <-> [D, heads, H]; [heads*H] <-> [heads, H]; o: [D, N*H] <-> [N, H, D]
    def w_in(n):
        return (lambda x: (x.reshape(n, H, D).transpose(2, 0, 1),), lambda p: p.transpose(1, 2, 0).reshape(n * H, D))

    def b_in(n):
        return (lambda x: (x.reshape(n, H),), lambda p: p.reshape(n * H))

    wo = (lambda x: (x.reshape(D, N, H).transpose(1, 2, 0),), lambda p: p.transpose(2, 0, 1).reshape(D, N * H))
    tr = (lambda x: (x.T,), lambda p: p.T)

    specs = []
    if layout == "hf":
        specs += [S("model.embed_tokens.weight", (V, D), [("embed_VD",)]),
                  S("model.norm.weight", (D,), [("norm",)], kind="norm"),
                  S("lm_head.weight", (V, D), [("lm_head_VD",)])]
        for i in range(cfg.num_hidden_layers):
            p, a, m = f"model.layers.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
            specs += [
                S(p + "input_layernorm.weight", (D,), [a + ("norm",)], kind="norm"),
                S(p + "post_attention_layernorm.weight", (D,), [m + ("norm",)], kind="norm"),
                S(p + "self_attn.q_proj.weight", (N * H, D), [a + ("wq_DNH",)], *w_in(N)),
                S(p + "self_attn.q_proj.bias", (N * H,), [a + ("bq_NH",)], *b_in(N), kind="bias"),
                S(p + "self_attn.k_proj.weight", (K * H, D), [a + ("wk_DKH",)], *w_in(K)),
                S(p + "self_attn.k_proj.bias", (K * H,), [a + ("bk_KH",)], *b_in(K), kind="bias"),
                S(p + "self_attn.v_proj.weight", (K * H, D), [a + ("wv_DKH",)], *w_in(K)),
                S(p + "self_attn.v_proj.bias", (K * H,), [a + ("bv_KH",)], *b_in(K), kind="bias"),
                S(p + "self_attn.o_proj.weight", (D, N * H), [a + ("wo_NHD",)], *wo),
                S(p + "self_attn.o_proj.bias", (D,), [a + ("bo_D",)], kind="bias"),
                S(p + "self_attn.sinks", (N,), [a + ("sinks_N",)], kind="sink"),
                S(p + "mlp.router.weight", (E, D), [m + ("wr_DE",)], *tr, kind="router"),
                S(p + "mlp.router.bias", (E,), [m + ("br_E",)], kind="bias"),
                S(p + "mlp.experts.gate_up_proj_blocks", (E, 2 * F, gd, nb), [m + ("w1_blocks",)], dtype="U8",
                  kind="blocks"),
                S(p + "mlp.experts.gate_up_proj_scales", (E, 2 * F, gd), [m + ("w1_scales",)], dtype="U8",
                  kind="scales"),
                S(p + "mlp.experts.gate_up_proj_bias", (E, 2 * F), [m + ("b1",)], kind="bias"),
                S(p + "mlp.experts.down_proj_blocks", (E, D, gf, nb), [m + ("w2_blocks",)], dtype="U8",
                  kind="blocks"),
                S(p + "mlp.experts.down_proj_scales", (E, D, gf), [m + ("w2_scales",)], dtype="U8", kind="scales"),
                S(p + "mlp.experts.down_proj_bias", (E, D), [m + ("b2",)], kind="bias"),
            ]
        return specs

    # OpenAI original layout: fused qkv (rows q | k | v), mlp1 = gate/up, mlp2 = down.
    nq, nk = N * H, K * H
    qkv_w = (lambda x: (x[:nq].reshape(N, H, D).transpose(2, 0, 1), x[nq:nq + nk].reshape(K, H, D).transpose(2, 0, 1),
                        x[nq + nk:].reshape(K, H, D).transpose(2, 0, 1)),
             lambda q, k, v: np.concatenate([q.transpose(1, 2, 0).reshape(nq, D), k.transpose(1, 2, 0).reshape(nk, D),
                                             v.transpose(1, 2, 0).reshape(nk, D)]))
    qkv_b = (lambda x: (x[:nq].reshape(N, H), x[nq:nq + nk].reshape(K, H), x[nq + nk:].reshape(K, H)),
             lambda q, k, v: np.concatenate([q.reshape(nq), k.reshape(nk), v.reshape(nk)]))
    specs += [S("embedding.weight", (V, D), [("embed_VD",)]),
              S("norm.scale", (D,), [("norm",)], kind="norm"),
              S("unembedding.weight", (V, D), [("lm_head_VD",)])]
    for i in range(cfg.num_hidden_layers):
        p, a, m = f"block.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
        specs += [
            S(p + "attn.norm.scale", (D,), [a + ("norm",)], kind="norm"),
            S(p + "attn.qkv.weight", (nq + 2 * nk, D), [a + ("wq_DNH",), a + ("wk_DKH",), a + ("wv_DKH",)], *qkv_w),
            S(p + "attn.qkv.bias", (nq + 2 * nk,), [a + ("bq_NH",), a + ("bk_KH",), a + ("bv_KH",)], *qkv_b,
              kind="bias"),
            S(p + "attn.sinks", (N,), [a + ("sinks_N",)], kind="sink"),
            S(p + "attn.out.weight", (D, nq), [a + ("wo_NHD",)], *wo),
            S(p + "attn.out.bias", (D,), [a + ("bo_D",)], kind="bias"),
            S(p + "mlp.norm.scale", (D,), [m + ("norm",)], kind="norm"),
            S(p + "mlp.gate.weight", (E, D), [m + ("wr_DE",)], *tr, kind="router"),
            S(p + "mlp.gate.bias", (E,), [m + ("br_E",)], kind="bias"),
            S(p + "mlp.mlp1_weight.blocks", (E, 2 * F, gd, nb), [m + ("w1_blocks",)], dtype="U8", kind="blocks"),
            S(p + "mlp.mlp1_weight.scales", (E, 2 * F, gd), [m + ("w1_scales",)], dtype="U8", kind="scales"),
            S(p + "mlp.mlp1_bias", (E, 2 * F), [m + ("b1",)], kind="bias"),
            S(p + "mlp.mlp2_weight.blocks", (E, D, gf, nb), [m + ("w2_blocks",)], dtype="U8", kind="blocks"),
            S(p + "mlp.mlp2_weight.scales", (E, D, gf), [m + ("w2_scales",)], dtype="U8", kind="scales"),
            S(p + "mlp.mlp2_bias", (E, D), [m + ("b2",)], kind="bias"),
        ]
    return specs


def release_shards(cfg: GptOssConfig, layout: str, specs: list[TensorSpec],
                   num_shards: int | None = None) -> list[tuple[str, list[TensorSpec]]]:
    """Split the tensors into the released file names: HF `model-0000i-of-0000{n-1}.safetensors`
    (zero-based: 3 files for 20b, 15 for 120b); original `model.safetensors` (20b) or
    `model--0000i-of-0000n.safetensors` (120b). Tensors are cut by bytes, in release order."""
    if num_shards is None:
        big = cfg.num_local_experts > 32
        num_shards = (15 if big else 3) if layout == "hf" else (7 if big else 1)
    if num_shards == 1:
        return [("model.safetensors", specs)]
    sizes = [math.prod(s.shape) * np.dtype(ST_DTYPES[s.dtype]).itemsize for s in specs]
    target = sum(sizes) / num_shards
    shards, cur, acc = [[] for _ in range(num_shards)], 0, 0
    for s, n in zip(specs, sizes):
        if acc >= target * (cur + 1) and cur < num_shards - 1 and shards[cur]:
            cur += 1
        shards[cur].append(s)
        acc += n
    shards = [s for s in shards if s]
    n = len(shards)
    if layout == "hf":
        names = [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    else:
        names = [f"model--{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


# ---------------------------------------------------------------------------------------------
# Finding and reading a checkpoint
# ---------------------------------------------------------------------------------------------
def detect_layout(path: str) -> str:
    """'orbax', 'hf' or 'original' for a local folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    if os.path.exists(os.path.join(path, ORBAX_MARKER)):
        return "orbax"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face folder, an original/ "
                              "folder or a gptoss-jax converted folder)")
    with open(cfg_path) as f:
        d = json.load(f)
    return "original" if "num_experts" in d and "num_local_experts" not in d else "hf"


def _open_files(path: str, layout: str) -> dict[str, SafetensorsFile]:
    """tensor name -> open file, via the HF index when present, else every *.safetensors."""
    index = os.path.join(path, HF_INDEX)
    if layout == "hf" and os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.exists(os.path.join(path, fn)):
                missing = sorted(k for k, v in weight_map.items() if v == fn)[:3]
                raise CheckpointError(f"{path}: shard {fn} listed in {HF_INDEX} is missing "
                                      f"(holds {', '.join(missing)}, ...)")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    opened = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in files}
    where: dict[str, SafetensorsFile] = {}
    for fn, st in opened.items():
        for name in st.entries:
            if name in where:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {os.path.basename(where[name].path)} "
                                      f"and {fn}")
            where[name] = st
    return where


def validate(where: dict[str, SafetensorsFile], specs: list[TensorSpec], path: str):
    expected = {s.name: s for s in specs}
    missing = [n for n in expected if n not in where]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    unexpected = sorted(n for n in where if n not in expected)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} in "
                              f"{os.path.basename(where[unexpected[0]].path)} (does config.json match?)")
    for s in specs:
        dtype, shape, _, _ = where[s.name].entries[s.name]
        fn = os.path.basename(where[s.name].path)
        if shape != s.shape:
            raise CheckpointError(f"{path}/{fn}: tensor {s.name!r} has shape {list(shape)}, "
                                  f"config expects {list(s.shape)}")
        if dtype != s.dtype:
            raise CheckpointError(f"{path}/{fn}: tensor {s.name!r} has dtype {dtype}, expected {s.dtype}")


def iter_checkpoint_params(path: str, cfg: GptOssConfig, layout: str,
                           progress: bool = True) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """(param path, host array) in release order, one tensor resident at a time."""
    specs = tensor_specs(cfg, layout)
    where = _open_files(path, layout)
    try:
        validate(where, specs, path)
        total = sum(math.prod(s.shape) * np.dtype(ST_DTYPES[s.dtype]).itemsize for s in specs)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                  leave=False) as bar:
            for s in specs:
                arrays = s.to_params(where[s.name].get(s.name))
                for p, arr in zip(s.params, arrays):
                    yield p, arr
                del arrays
                where[s.name].release(s.name)
                bar.update(math.prod(s.shape) * np.dtype(ST_DTYPES[s.dtype]).itemsize)
    finally:
        for st in set(where.values()):
            st.close()


def flat_key(p: ParamPath) -> str:
    return "/".join(str(x) for x in p)


def _param_path(key: tuple) -> ParamPath:
    return tuple(k.key if hasattr(k, "key") else k for k in key)


def assemble(abstract_model, arrays: dict[ParamPath, jax.Array]):
    """Abstract model + concrete arrays keyed by param path -> model (every leaf must be given)."""
    graphdef, state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(state)
    leaves = []
    for key, var in flat:
        p = _param_path(key)
        if p not in arrays:
            raise CheckpointError(f"no value loaded for parameter {flat_key(p)}")
        leaves.append((key, var.replace(arrays[p])))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def param_leaves(model) -> dict[ParamPath, jax.Array | jax.ShapeDtypeStruct]:
    """Parameter path -> leaf (arrays; ShapeDtypeStructs for an abstract model)."""
    return {_param_path(k): (v.get_value() if hasattr(v, "get_value") else v.value)
            for k, v in nnx.to_flat_state(nnx.state(model))}


def load_safetensors_model(path: str, abstract_model, layout: str, *, shardings=None, progress=True):
    leaves = param_leaves(abstract_model)
    arrays = {}
    for p, host in iter_checkpoint_params(path, abstract_model.config, layout, progress):
        want = leaves[p]
        if host.shape != tuple(want.shape):
            raise CheckpointError(f"{path}: parameter {flat_key(p)} has shape {host.shape}, expected {want.shape}")
        sharding = shardings.get(p) if shardings else None
        if sharding is None:
            arrays[p] = jax.device_put(np.asarray(host, dtype=want.dtype))
        else:  # straight into shards: each process copies only its devices' slices of the mmap view
            arrays[p] = jax.make_array_from_callback(
                tuple(want.shape), sharding, lambda idx, h=host, dt=want.dtype: np.asarray(h[idx], dtype=dt))
        # Transfers are asynchronous: wait for each, so the host holds one tensor's pages, not a queue.
        arrays[p].block_until_ready()
    return assemble(abstract_model, arrays)


# ---------------------------------------------------------------------------------------------
# orbax: convert and load
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    """Yield a temporary sibling folder; rename it to `dst` only if the block succeeds."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(dst):
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_side_files(src: str, dst: str, cfg: GptOssConfig):
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)
    gen = os.path.join(src, "generation_config.json")
    if os.path.exists(gen):
        shutil.copy(gen, os.path.join(dst, "generation_config.json"))


def _group(p: ParamPath) -> str:
    """orbax item a parameter is saved in: one per transformer block, one for the rest."""
    return f"block_{p[1]:03d}" if p[0] == "blocks" else "top"


def convert(src: str, dst: str, *, overwrite: bool = False, progress: bool = True) -> str:
    """Released checkpoint (local folder or Hub id) -> orbax folder, atomically.

    Saved as one orbax item per transformer block (params/block_000, ...) plus params/top, so
    host memory holds one block at a time, also for gpt-oss-120b."""
    import orbax.checkpoint as ocp

    src = resolve(src)
    layout = detect_layout(src)
    if layout == "orbax":
        raise CheckpointError(f"{src} is already a converted gptoss-jax checkpoint")
    cfg = load_config(src)
    with atomic_dir(dst, overwrite) as tmp:
        # Uncompressed: MXFP4 codes and bf16 weights hardly compress, and zstd halves the restore speed.
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
        group, arrays = None, {}

        def flush():
            if arrays:
                ckptr.save(os.path.join(tmp, "params", group), dict(arrays))  # synchronous
                arrays.clear()

        for p, a in iter_checkpoint_params(src, cfg, layout, progress):
            if _group(p) != group:
                flush()
                group = _group(p)
            arrays[flat_key(p)] = np.array(a)
        flush()
        _copy_side_files(src, tmp, cfg)
        with open(os.path.join(tmp, ORBAX_MARKER), "w") as f:
            json.dump({"format": ORBAX_FORMAT, "source_layout": layout}, f)
    return dst


def load_orbax_model(path: str, abstract_model, *, shardings=None):
    import orbax.checkpoint as ocp

    with open(os.path.join(path, ORBAX_MARKER)) as f:
        marker = json.load(f)
    if marker.get("format") != ORBAX_FORMAT:
        raise CheckpointError(f"{path}: unknown gptoss-jax format {marker.get('format')!r}")
    leaves = param_leaves(abstract_model)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets: dict[str, dict] = {}
    for p, v in leaves.items():
        sharding = (shardings or {}).get(p, default)
        targets.setdefault(_group(p), {})[flat_key(p)] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    ckptr, restored = ocp.StandardCheckpointer(), {}
    for group, target in targets.items():
        item = os.path.join(path, "params", group)
        if not os.path.isdir(item):
            raise CheckpointError(f"{path}: no params/{group} (interrupted or mismatched conversion?)")
        try:
            restored.update(ckptr.restore(item, target))
        except Exception as e:  # orbax raises several types for structure/shape mismatches
            raise CheckpointError(f"{path}: cannot restore params/{group}: {e}") from e
    return assemble(abstract_model, {p: restored[flat_key(p)] for p in leaves})


# ---------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------
def resolve(path_or_repo_id: str) -> str:
    """A local folder as is (its `original/` subfolder when the top has no weights is not guessed);
    otherwise a Hub repo id, downloading only what loading needs (not original/ or metal/)."""
    p = os.path.expanduser(os.fspath(path_or_repo_id))
    if os.path.exists(p):
        return p
    if p.count("/") != 1 or p.startswith((".", "/")):
        raise FileNotFoundError(f"{path_or_repo_id}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(p, allow_patterns=HUB_PATTERNS)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise RuntimeError(
            f"could not download {p!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the checkpoint elsewhere and pass its local folder.") from e


# ---------------------------------------------------------------------------------------------
# Random checkpoints in the exact released layout
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RandomInit:
    """Standard deviations of the random weights; sinks and router spread wide enough that
    routing and sinks matter and top-k has no near-ties."""

    dense: float = 0.02
    norm: float = 0.1  # around 1
    bias: float = 0.02
    sink: float = 1.0
    router: float = 0.02
    scale_center: int = 122  # E8M0: 2**-5
    scale_spread: int = 1


def random_tensor(spec: TensorSpec, rng: np.random.Generator, init: RandomInit | None) -> np.ndarray:
    if init is None:
        return np.zeros(spec.shape, ST_DTYPES[spec.dtype])
    if spec.kind == "blocks":
        return rng.integers(0, 256, size=spec.shape, dtype=np.uint8)
    if spec.kind == "scales":
        return rng.integers(init.scale_center - init.scale_spread, init.scale_center + init.scale_spread + 1,
                            size=spec.shape, dtype=np.uint8)
    std = getattr(init, spec.kind)
    x = rng.standard_normal(size=spec.shape, dtype=np.float32) * np.float32(std)
    if spec.kind == "norm":
        x += 1.0
    return x.astype(ml_dtypes.bfloat16)


def write_random_checkpoint(cfg: GptOssConfig, dst: str, *, layout: str = "hf", seed: int = 0,
                            num_shards: int | None = None, init: RandomInit | None = RandomInit(),
                            overwrite: bool = False, progress: bool = True) -> str:
    """Random weights written shard by shard in the exact released layout (MXFP4 packed).

    `init=None` writes all-zero weights as sparse files: the exact layout at almost no disk cost.
    """
    rng = np.random.default_rng(seed)
    return _write_checkpoint(cfg, dst, layout, lambda s: random_tensor(s, rng, init), num_shards=num_shards,
                             overwrite=overwrite, progress=progress, sparse=init is None,
                             desc="writing random checkpoint")


def save_checkpoint(model, dst: str, *, layout: str = "hf", num_shards: int | None = None,
                    overwrite: bool = False, progress: bool = True) -> str:
    """Write a model's parameters in a released layout (Hugging Face or original), as stored
    (bf16, MXFP4 packed). The result loads in `load_model`, transformers and OpenAI's reference."""
    leaves = param_leaves(model)

    @functools.lru_cache(maxsize=1)
    def experts_back(layer: int) -> dict:  # experts held in the Pallas kernel layout: back, layer by layer
        return model.blocks[layer].mlp.checkpoint_expert_weights()

    def leaf(p: ParamPath):
        return leaves[p] if p in leaves else experts_back(p[1])[p[-1]]

    def produce(s: TensorSpec):
        return s.from_params(*(np.asarray(jax.device_get(leaf(p))) for p in s.params))

    return _write_checkpoint(model.config, dst, layout, produce, num_shards=num_shards, overwrite=overwrite,
                             progress=progress, desc="writing checkpoint")


def _generation_config(cfg: GptOssConfig) -> dict:
    """As released for the o200k_harmony vocabulary (stop on <|return|>, <|endoftext|>, <|call|>);
    a test vocabulary of another size stops on its own eos only."""
    from . import tokenizer

    if cfg.vocab_size == tokenizer.VOCAB_SIZE:
        return {"bos_token_id": tokenizer.STARTOFTEXT, "do_sample": True,
                "eos_token_id": list(tokenizer.DEFAULT_STOP_TOKEN_IDS), "pad_token_id": cfg.pad_token_id}
    return {"do_sample": True, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def _write_checkpoint(cfg: GptOssConfig, dst: str, layout: str, produce: Callable[[TensorSpec], np.ndarray], *,
                      num_shards, overwrite, progress, desc, sparse=False) -> str:
    specs = tensor_specs(cfg, layout)
    shards = release_shards(cfg, layout, specs, num_shards)
    total = sum(math.prod(s.shape) * np.dtype(ST_DTYPES[s.dtype]).itemsize for s in specs)
    with atomic_dir(dst, overwrite) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                                  disable=not progress) as bar:
        weight_map = {}
        for fn, shard in shards:
            def producer(s):
                def produce_one():
                    arr = None if sparse else produce(s)
                    bar.update(math.prod(s.shape) * np.dtype(ST_DTYPES[s.dtype]).itemsize)
                    return arr
                return produce_one
            write_safetensors(os.path.join(tmp, fn), [(s.name, s.shape, s.dtype, producer(s)) for s in shard])
            weight_map.update({s.name: fn for s in shard})
        if layout == "hf" and len(shards) > 1:
            with open(os.path.join(tmp, HF_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict() if layout == "hf" else cfg.to_original_dict(), f, indent=2)
        if layout == "hf":
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(_generation_config(cfg), f, indent=2)
    return dst
