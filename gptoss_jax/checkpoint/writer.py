"""Writing checkpoints in a released layout: a model's parameters (`save_checkpoint`) or any
producer of tensors, shard by shard, into a temporary folder renamed into place."""

from __future__ import annotations

import functools
import json
import os
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from .. import tokenizer
from ..config import GptOssConfig
from ..params import ParamPath, param_leaves
from .atomic import atomic_dir
from .layout import HF_INDEX, TensorSpec, release_shards, tensor_specs
from .safetensors_io import nbytes, write_safetensors


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

    return write_checkpoint(model.config, dst, layout, produce, num_shards=num_shards, overwrite=overwrite,
                             progress=progress, desc="writing checkpoint")


def _generation_config(cfg: GptOssConfig) -> dict:
    """As released for the o200k_harmony vocabulary (stop on <|return|>, <|endoftext|>, <|call|>);
    a test vocabulary of another size stops on its own eos only."""
    if cfg.vocab_size == tokenizer.VOCAB_SIZE:
        return {"bos_token_id": tokenizer.STARTOFTEXT, "do_sample": True,
                "eos_token_id": list(tokenizer.DEFAULT_STOP_TOKEN_IDS), "pad_token_id": cfg.pad_token_id}
    return {"do_sample": True, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


def write_checkpoint(cfg: GptOssConfig, dst: str, layout: str, produce: Callable[[TensorSpec], np.ndarray], *,
                      num_shards, overwrite, progress, desc, sparse=False) -> str:
    specs = tensor_specs(cfg, layout)
    shards = release_shards(cfg, layout, specs, num_shards)
    total = sum(nbytes(s.shape, s.dtype) for s in specs)
    with atomic_dir(dst, overwrite) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                                  disable=not progress) as bar:
        weight_map = {}
        for fn, shard in shards:
            def producer(s):
                def produce_one():
                    arr = None if sparse else produce(s)
                    bar.update(nbytes(s.shape, s.dtype))
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
