"""Public entry points: load a model from any supported checkpoint."""

from __future__ import annotations

import jax

from . import checkpoint as ckpt
from .config import GenerationDefaults, load_config
from .model import GptOss, abstract_model

KERNEL_CHOICES = ("auto", "xla", "pallas")


def pallas_available() -> bool:
    try:
        from pallas_kernels import banded_attention, mxfp4_gmm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernels(kernels: str) -> str:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        on_accelerator = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
        return "pallas" if on_accelerator and pallas_available() else "xla"
    if kernels == "pallas" and not pallas_available():
        raise ValueError("kernels='pallas' needs the pallas_kernels package (mxfp4_gmm, banded_attention), "
                         "which cannot be imported here; use kernels='xla' or 'auto'")
    return kernels


def load_model(path_or_repo_id: str, *, dtype: str = "bfloat16", mesh=None, kernels: str = "auto",
               progress: bool = True, rules=None) -> GptOss:
    """Load gpt-oss from a Hugging Face folder, an `original/` folder, a folder converted by
    `gptoss-jax convert`, or a Hugging Face repo id (downloads the safetensors only).

    `dtype` is the compute dtype ("bfloat16" or "float32"); parameters keep the checkpoint dtypes
    with the MXFP4 experts packed. `kernels`: "xla", "pallas" (the Pallas MXFP4 grouped matmul and
    banded attention; the experts are re-laid once for the kernel, same bytes) or "auto" (Pallas on
    GPU / TPU, XLA elsewhere; on CPU "pallas" runs the kernels in interpret mode, for tests).

    `mesh`: a `jax.sharding.Mesh` with axes among ("data", "expert", "model") (see
    `gptoss_jax.sharding.make_mesh`); parameters are placed by `rules` (default
    `sharding.DEFAULT_RULES`), each process reading only its own shards; the MoE then runs expert
    parallel. Multi-host: call `jax.distributed.initialize` first and pass the global mesh.
    """
    kernels = resolve_kernels(kernels)
    path = ckpt.resolve(path_or_repo_id)
    layout = ckpt.detect_layout(path)
    cfg = load_config(path)
    abstract = abstract_model(cfg, dtype=dtype, kernels=kernels)
    shardings = None
    if mesh is not None:  # every parameter loaded straight into its shards (gptoss_jax/sharding.py)
        from . import sharding as shd
        rules = shd.DEFAULT_RULES if rules is None else rules
        shardings = shd.param_shardings(abstract, mesh, rules)
    if layout == "orbax":
        model = ckpt.load_orbax_model(path, abstract, shardings=shardings)
    else:
        model = ckpt.load_safetensors_model(path, abstract, layout, shardings=shardings, progress=progress)
    model.generation_defaults = GenerationDefaults.load(path, cfg)
    if mesh is not None:
        shd.attach(model, mesh, rules)
    if kernels == "pallas":  # one-time re-layout of the experts for the MXFP4 kernel
        model.to_kernel_layout()
    return model
