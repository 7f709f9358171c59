# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sharded inference: a device mesh, expert parallelism, and an AOT deployment plan
#
# Run gpt-oss over several devices: a TPU v5e-8 (Colab / Cloud TPU), or a machine with several GPUs.
# The mesh has three axes, `data` (batch rows), `expert` (the MoE experts: expert parallelism) and `model`
# (attention heads and vocabulary); `load_model(..., mesh=mesh)` reads every parameter straight into its
# shards.
#
# First, without any hardware: `gptoss-jax aot` compiles prefill and decode for a target from abstract
# shapes and tells whether the model fits, and how much memory each device needs.
#
# The model comes from `GPTOSS_MODEL` (default `openai/gpt-oss-20b`). CI runs this notebook on CPU with a
# tiny random checkpoint and 8 forced CPU devices (`GPTOSS_CPU_DEVICES=8`), or on the single CPU device.

# %%
import os
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab only: JAX for the runtime's accelerator, then gptoss-jax
    source = os.environ.get("GPTOSS_JAX_SOURCE", "/content/gptoss-jax")
    accel = "tpu" if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ else "cuda12"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jax[{accel}]==0.10.2", source], check=True)

# CPU only (CI, laptops): pretend to have N devices. Must happen before JAX starts.
if os.environ.get("GPTOSS_CPU_DEVICES"):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.environ['GPTOSS_CPU_DEVICES']}")

# %% [markdown]
# ## The runtime
# What this runtime is, what its deployment plan says about gpt-oss-20b (deviceless compiles, see
# docs/notebooks.md), and the settings the rest of the notebook uses. On a GPU, JAX's allocator may then
# take 95% of the memory (JAX's default, 75%, leaves a T4 or an L4 too little): this must run before JAX
# starts, hence first.

# %%
from gptoss_jax import runtimes

runtimes.use_planned_memory_fraction()
RT = runtimes.detect()
print(RT.describe())

# %%
import json
import shutil

import jax
import numpy as np

import gptoss_jax as gj
from gptoss_jax import sharding as shd
from gptoss_jax.harmony import parse_completion, render_prompt

MODEL = os.environ.get("GPTOSS_MODEL", "openai/gpt-oss-20b")
MAX_TOKENS = int(os.environ.get("GPTOSS_MAX_TOKENS", "256"))
AOT_TARGET = os.environ.get("GPTOSS_AOT_TARGET", "tpu-v5e")
print(f"{jax.device_count()} devices: {jax.devices()}")

# %% [markdown]
# ## 1. A deployment plan without hardware (`gptoss-jax aot`)
# Deviceless compiles need the compile-only toolchains (`pip install "gptoss-jax[aot]"`: libtpu, the JAX CUDA
# plugin). Here: gpt-oss on a TPU v5e-8, the experts split over the 8 chips.

# %%
exe = shutil.which("gptoss-jax")
cmd = ([exe] if exe else [sys.executable, "-m", "gptoss_jax.cli"]) + [
    "aot", "--target", AOT_TARGET, "--devices", "8", "--model", MODEL, "--batch", "8", "--max-len", "1024",
    "--prefill-chunk", "128", "--json"]
print("$", " ".join(cmd[1:] if exe else ["gptoss-jax", *cmd[3:]]))
r = subprocess.run(cmd, capture_output=True, text=True)
if r.stdout.strip():
    lines = r.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    try:
        plan = json.loads(lines[-1])
        print(f"fits: {plan['fits']}, {plan['total_bytes_per_device'] / 2**30:.2f} GiB per device")
    except (json.JSONDecodeError, KeyError):
        print(lines[-1])
if r.returncode not in (0, 1):  # 1: compiled, but does not fit
    print("aot plan not available here:", r.stderr.strip().splitlines()[-1:] or r.returncode)

# %% [markdown]
# ## 2. A mesh over the devices we have
# Experts over as many devices as divide the expert count (32 for 20b, 128 for 120b), the rest over the
# batch (`data`).

# %%
n = jax.device_count()
num_experts = gj.load_config(gj.checkpoint.resolve(MODEL)).num_local_experts
expert = max(d for d in range(1, n + 1) if n % d == 0 and num_experts % d == 0)
mesh = shd.make_mesh(data=n // expert, expert=expert, model=1)
print(shd.describe(mesh))

# %%
model = gj.load_model(MODEL, mesh=mesh, dtype=RT.dtype, kernels=RT.kernels)
for device, nbytes in shd.bytes_per_device(model).items():
    print(f"{device}: {nbytes / 2**30:.3f} GiB of parameters")
mlp = model.blocks[0].mlp  # experts in the Pallas kernel layout (w1_q) on GPU/TPU, packed blocks on CPU
w1 = (mlp.w1_q if mlp.kernel_layout else mlp.w1_blocks)[...]
print("layer 0 expert weights", w1.shape, "sharded as", w1.sharding.spec)

# %% [markdown]
# ## 3. Batched, sharded generation
# Rows are split over `data`; every expert group runs only its own experts.

# %%
questions = ["What is 2 + 2?", "Name a prime number.", "What colour is the sky?", "Say hi."]
batch = mesh.shape["data"] * ((len(questions) + mesh.shape["data"] - 1) // mesh.shape["data"])
questions = (questions * batch)[:batch]
prompts = [render_prompt([{"role": "user", "content": q}], reasoning_effort="low") for q in questions]
out = gj.generate(model, prompts, max_new_tokens=MAX_TOKENS, temperature=0.7, seed=0, prefill_chunk=RT.prefill_chunk)
for q, toks, n_tok in zip(questions, out.tokens, out.lengths):
    print(f"{q!r} -> {parse_completion(toks[:n_tok]).final!r}")

# %% [markdown]
# The same from the command line on the accelerator machine: `gptoss-jax generate --prompt "..."`; for a
# plan of gpt-oss-120b on 8 H100s: `gptoss-jax aot --target h100 --devices 8 --model gpt-oss-120b`.
