"""The runtime a notebook or script runs on, and the gpt-oss-20b settings its deployment plan fits.

    from gptoss_jax import runtimes
    runtimes.use_planned_memory_fraction()   # before the first JAX computation (GPUs: see below)
    rt = runtimes.detect()                   # from jax.devices()[0]: T4, L4, A100, H100, TPU v5e / v6e, CPU
    print(rt.describe())
    model = load_model(path, dtype=rt.dtype, kernels=rt.kernels)
    generate(model, prompts, max_new_tokens=..., prefill_chunk=rt.prefill_chunk)   # context <= rt.max_len

The figures are deviceless plans (`gptoss-jax aot`, run by benchmarks/deployment_plans.py: XLA's memory
analysis of the compiled programs for the target, no hardware), not measurements; the decode rate is
a roofline upper bound. They assume what `use_planned_memory_fraction` sets on GPUs: JAX's allocator
may take 95% of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; JAX's own default, 75%, leaves a T4 or
an L4 too little for gpt-oss-20b).
"""

from __future__ import annotations

import dataclasses
import os

from .aot import GPU_MEM_FRACTION

MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@dataclasses.dataclass(frozen=True)
class Finetune:
    """LoRA (rank 8 on q, k, v, o) settings whose training step fits gpt-oss-20b on the runtime."""

    seq_len: int
    batch_size: int = 1
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class RuntimePlan:
    name: str  # the `gptoss-jax aot --target`, or "cpu" / "unplanned"
    device: str  # what JAX calls the device
    dtype: str  # compute dtype (what load_model(dtype="auto") picks there)
    kernels: str  # what load_model(kernels="auto") picks there
    prefill_chunk: int  # prompt tokens per prefill step
    max_len: int | None = None  # prompt + reply tokens of gpt-oss-20b that fit at prefill_chunk (None: no plan)
    decode_bound: float | None = None  # tokens/s at batch 1 and max_len: a roofline upper bound
    finetune: Finetune | None = None  # None: 20b LoRA does not fit (or no plan)
    note: str = ""

    def describe(self) -> str:
        lines = [f"runtime: {self.device} ({self.name}); dtype {self.dtype}, {self.kernels} kernels"]
        if self.max_len is None:
            lines.append("no deployment plan for this device: `gptoss-jax aot --target ...` makes one")
        else:
            lines.append(f"gpt-oss-20b plan (deviceless): fits with up to {self.max_len} tokens of context at prefill "
                         f"chunk {self.prefill_chunk}; decode <= {self.decode_bound:.0f} tokens/s (roofline bound, "
                         "batch 1)")
            ft = self.finetune
            lines.append("LoRA fine-tuning of gpt-oss-20b: " + (
                f"fits at batch {ft.batch_size} x {ft.seq_len} tokens{' with remat' if ft.remat else ''}" if ft
                else "does not fit this device"))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


# From benchmarks/deployment_plans.py (gpt-oss-20b, batch 1; the README's tables): the context is capped at
# 8192 here (a chat's worth, with headroom) where the plan's largest is more; decode bounds at an 8k context.
PLANS = {
    "t4": RuntimePlan("t4", "Tesla T4", "float16", "xla", 128, 8192, 82, None,
                      "T4: no bf16 tensor cores and no Triton (sm_75): float16 compute, XLA kernels; with prefill "
                      "chunks of 128 up to 19968 tokens fit (5888 with chunks of 512); 13.97 GB of weights and "
                      "cache leave too little for a LoRA step"),
    "l4": RuntimePlan("l4", "NVIDIA L4", "bfloat16", "pallas", 512, 8192, 76, Finetune(1024, remat=True)),
    "a100-40g": RuntimePlan("a100-40g", "NVIDIA A100-SXM4-40GB", "bfloat16", "pallas", 512, 8192, 395,
                            Finetune(2048)),
    # the 40 GB A100's LoRA plan, with twice the memory
    "a100-80g": RuntimePlan("a100-80g", "NVIDIA A100-SXM4-80GB", "bfloat16", "pallas", 512, 8192, 517,
                            Finetune(2048)),
    "h100": RuntimePlan("h100", "NVIDIA H100 80GB HBM3", "bfloat16", "pallas", 512, 8192, 851, Finetune(2048)),
    "tpu-v5e": RuntimePlan("tpu-v5e", "TPU v5 lite", "bfloat16", "pallas", 512, 8192, 208, None,
                           "TPU v5e-1: the LoRA step's temporaries (20.4 GB at 1024 tokens) do not fit beside the "
                           "14 GB of weights in 16 GiB; a v6e-1 (32 GiB) trains it"),
    "tpu-v6e": RuntimePlan("tpu-v6e", "TPU v6 lite", "bfloat16", "pallas", 512, 8192, 416, Finetune(1024, remat=True)),
}
CPU = RuntimePlan("cpu", "CPU", "bfloat16", "xla", 512, note="CPU: for tests and tiny checkpoints; gpt-oss-20b "
                                                              "wants a GPU or TPU runtime")


def use_planned_memory_fraction(environ=None) -> str:
    """Let JAX's GPU allocator take the fraction the plans assume (unless the variable is set). Only a
    backend that has not started yet reads it: call this before the first JAX computation."""
    environ = os.environ if environ is None else environ
    return environ.setdefault(MEM_FRACTION_VAR, str(GPU_MEM_FRACTION))


def target_of(device) -> str | None:
    """The `gptoss-jax aot --target` of a JAX device, None if not planned."""
    kind = str(device.device_kind)
    if device.platform == "tpu":
        return {"TPU v5 lite": "tpu-v5e", "TPU v6 lite": "tpu-v6e"}.get(kind)
    if device.platform not in ("gpu", "cuda"):
        return None
    for marker, name in (("T4", "t4"), ("L4", "l4"), ("H100", "h100")):
        if marker in kind.split() or kind.endswith(marker):
            return name
    if "A100" in kind:
        return "a100-80g" if "80GB" in kind else "a100-40g"
    return None


def detect(device=None) -> RuntimePlan:
    """The plan of `device` (default: JAX's first device). A device without a plan gets what
    `load_model`'s "auto" picks there and no context figures."""
    import jax

    from .runtime import resolve_dtype, resolve_kernels

    device = jax.devices()[0] if device is None else device
    name = target_of(device)
    if name is not None:
        return PLANS[name]
    if device.platform == "cpu":
        return CPU
    return RuntimePlan("unplanned", str(device.device_kind), resolve_dtype("auto", device),
                       resolve_kernels("auto", device), 512)
