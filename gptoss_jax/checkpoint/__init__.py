"""Checkpoint IO, one module per responsibility:

  safetensors_io  the file format (lazy mmap reads with exact checks, streamed writes)
  layout          the release layout tables (`tensor_specs`), shard names, layout detection
  reader          validate and stream a released checkpoint onto devices / into shards
  writer          write a model (or any tensor producer) in a released layout
  orbax_io        our orbax format: `convert` and loading it back
  hub             Hugging Face Hub resolution / download
  random_init     random checkpoints in the exact released layout
  atomic          temporary-folder-then-rename writes

Parameter-tree utilities live in `gptoss_jax.params`; the MXFP4 codec in `pallas_kernels.mxfp4`.
"""

from ..errors import CheckpointError
from .hub import HUB_PATTERNS, resolve
from .layout import HF_INDEX, ORBAX_MARKER, TensorSpec, detect_layout, release_shards, tensor_specs
from .orbax_io import ORBAX_FORMAT, convert, load_orbax_model
from .random_init import RandomInit, random_tensor, write_random_checkpoint
from .reader import iter_checkpoint_params, load_safetensors_model, validate
from .safetensors_io import ST_DTYPES, ST_NAMES, SafetensorsFile, nbytes, write_safetensors
from .writer import save_checkpoint, write_checkpoint

__all__ = ["CheckpointError", "HF_INDEX", "HUB_PATTERNS", "ORBAX_FORMAT", "ORBAX_MARKER", "RandomInit", "ST_DTYPES",
           "ST_NAMES", "SafetensorsFile", "TensorSpec", "convert", "detect_layout", "iter_checkpoint_params",
           "load_orbax_model", "load_safetensors_model", "nbytes", "random_tensor", "release_shards", "resolve",
           "save_checkpoint", "tensor_specs", "validate", "write_checkpoint", "write_random_checkpoint",
           "write_safetensors"]
