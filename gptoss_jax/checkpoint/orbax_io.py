"""Our orbax format: `convert` (released checkpoint -> one orbax item per block) and loading it
back with the target shardings."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from ..config import GptOssConfig, load_config
from ..errors import CheckpointError, read_json_object
from ..params import ParamPath, assemble, flat_key, param_leaves
from .atomic import atomic_dir, signals_deferred
from .hub import resolve
from .layout import ORBAX_MARKER, detect_layout
from .reader import iter_checkpoint_params

ORBAX_FORMAT = "gptoss-jax-orbax-v1"


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
    with atomic_dir(dst, overwrite, source=src) as tmp:  # refuses a dst that is, holds or is in src
        # Uncompressed: MXFP4 codes and bf16 weights hardly compress, and zstd halves the restore speed.
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
        group, arrays = None, {}

        def flush():
            if arrays:
                with signals_deferred():  # orbax's writer threads must not outlive the temporary
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

    path = os.path.abspath(path)  # orbax restores absolute paths only
    marker = read_json_object(os.path.join(path, ORBAX_MARKER), "the gptoss-jax marker")
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

