"""Random checkpoints in the exact released layout (MXFP4 packed, released shard names)."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from ..config import GptOssConfig
from .layout import TensorSpec
from .safetensors_io import ST_DTYPES
from .writer import write_checkpoint


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
    return write_checkpoint(cfg, dst, layout, lambda s: random_tensor(s, rng, init), num_shards=num_shards,
                             overwrite=overwrite, progress=progress, sparse=init is None,
                             desc="writing random checkpoint")

