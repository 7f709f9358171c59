"""Public entry points: load a model from any supported checkpoint."""

from __future__ import annotations

from . import checkpoint as ckpt
from .config import GenerationDefaults, load_config
from .model import GptOss, abstract_model
from .runtime import Runtime, resolve_dtype, target_device


def load_model(path_or_repo_id: str, *, dtype: str = "auto", mesh=None, kernels: str = "auto",
               progress: bool = True, rules=None) -> GptOss:
    """Load gpt-oss from a Hugging Face folder, an `original/` folder, a folder converted by
    `gptoss-jax convert`, or a Hugging Face repo id (downloads the safetensors only).

    `dtype` is the compute dtype ("bfloat16", "float16", "float32", or "auto": what the device runs
    natively, `runtime.resolve_dtype`: float16 on GPUs without bf16 MMA such as the T4, bfloat16
    elsewhere); parameters keep the checkpoint dtypes with the MXFP4 experts packed (float16 compute
    holds the dense ones in float16). `kernels`: "xla", "pallas" (the Pallas MXFP4 grouped matmul and
    banded attention; the experts are re-laid once for the kernel, same bytes) or "auto" (what runs
    on the device, `runtime.resolve_kernels`: Pallas on TPU and on GPUs from sm_80, XLA on older
    GPUs and on CPU; on CPU "pallas" runs the kernels in interpret mode, for tests).

    `mesh`: any `jax.sharding.Mesh` (from `jax.make_mesh`, Explicit axes, or `jax.sharding.Mesh` /
    `gptoss_jax.sharding.make_mesh`, Auto axes) with axes among ("data", "expert", "model");
    parameters are placed on it by `rules` (default `sharding.DEFAULT_RULES`), each process reading
    only its own shards; the MoE then runs expert parallel. Multi-host: call
    `jax.distributed.initialize` first and pass the global mesh.
    """
    runtime = Runtime.create(kernels, mesh, rules)
    dtype = resolve_dtype(dtype, target_device(mesh))
    path = ckpt.resolve(path_or_repo_id)
    layout = ckpt.detect_layout(path)
    cfg = load_config(path)
    abstract = abstract_model(cfg, dtype=dtype, runtime=runtime)
    shardings = runtime.param_shardings(abstract)  # every parameter loaded straight into its shards
    if layout == "orbax":
        model = ckpt.load_orbax_model(path, abstract, shardings=shardings)
    else:
        model = ckpt.load_safetensors_model(path, abstract, layout, shardings=shardings, progress=progress)
    model.generation_defaults = GenerationDefaults.load(path, cfg)
    if runtime.moe.kernel_layout:  # one-time re-layout of the experts for the MXFP4 kernel
        model.to_kernel_layout()
    return model
