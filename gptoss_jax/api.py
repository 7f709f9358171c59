"""Public entry points: load a model from any supported checkpoint."""

from __future__ import annotations

import jax

from . import checkpoint as ckpt
from .config import GenerationDefaults, load_config
from .model import GptOss, abstract_model

KERNEL_CHOICES = ("auto", "xla", "pallas")


def pallas_available() -> bool:
    try:
        from pallas_kernels import mxfp4_gmm  # noqa: F401
    except ImportError:
        return False
    from .layers import experts_pallas
    return getattr(experts_pallas, "available", False)


def resolve_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        on_accelerator = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
        return "pallas" if on_accelerator and pallas_available() else "xla"
    if kernels == "pallas" and not pallas_available():
        raise ValueError("kernels='pallas' needs the Pallas kernels (pallas_kernels.mxfp4_gmm and "
                         "pallas_kernels.banded_attention), which this build does not have yet; "
                         "use kernels='xla' or 'auto'")
    return kernels


def load_model(path_or_repo_id: str, *, dtype: str = "bfloat16", mesh=None, kernels: str = "auto",
               progress: bool = True) -> GptOss:
    """Load gpt-oss from a Hugging Face folder, an `original/` folder, a folder converted by
    `gptoss-jax convert`, or a Hugging Face repo id (downloads the safetensors only).

    `dtype` is the compute dtype ("bfloat16" or "float32"); parameters keep the checkpoint dtypes
    with the MXFP4 experts packed. `kernels`: "xla", "pallas" or "auto".
    """
    kernels = resolve_kernels(kernels)
    if mesh is not None:
        raise NotImplementedError("mesh= (sharded loading) is not supported yet; load on one device")
    path = ckpt.resolve(path_or_repo_id)
    layout = ckpt.detect_layout(path)
    cfg = load_config(path)
    abstract = abstract_model(cfg, dtype=dtype, kernels=kernels)
    if layout == "orbax":
        model = ckpt.load_orbax_model(path, abstract)
    else:
        model = ckpt.load_safetensors_model(path, abstract, layout, progress=progress)
    model.generation_defaults = GenerationDefaults.load(path, cfg)
    return model
