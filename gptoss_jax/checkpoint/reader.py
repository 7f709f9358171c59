"""Reading a released checkpoint: open the shards, validate every tensor against the layout
table, stream (param path, host array) pairs and load them onto devices (or straight into shards)."""

from __future__ import annotations

import os
from typing import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from ..config import GptOssConfig
from ..errors import CheckpointError, read_json_object
from ..params import ParamPath, assemble, flat_key, param_leaves
from .layout import HF_INDEX, TensorSpec, tensor_specs
from .safetensors_io import SafetensorsFile, nbytes


def _open_files(path: str, layout: str) -> dict[str, SafetensorsFile]:
    """tensor name -> open file, via the HF index when present, else every *.safetensors."""
    index = os.path.join(path, HF_INDEX)
    if layout == "hf" and os.path.exists(index):
        weight_map = read_json_object(index, "the shard index").get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and os.path.basename(v) == v and v.endswith(".safetensors")
                for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to .safetensors file names "
                                  "in the same folder")
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
        total = sum(nbytes(s.shape, s.dtype) for s in specs)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                  leave=False) as bar:
            for s in specs:
                arrays = s.to_params(where[s.name].get(s.name))
                for p, arr in zip(s.params, arrays):
                    yield p, arr
                del arrays
                where[s.name].release(s.name)
                bar.update(nbytes(s.shape, s.dtype))
    finally:
        for st in set(where.values()):
            st.close()

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

