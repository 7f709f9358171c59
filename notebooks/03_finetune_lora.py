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
# # Fine-tuning gpt-oss with LoRA
#
# LoRA adapters on the attention projections of gpt-oss, trained with optax (AdamW, warmup + cosine decay,
# gradient clipping) while the MXFP4 experts stay frozen and packed; orbax checkpoints of the training state
# (resumable), then an export of the merged model in the Hugging Face layout, which `load_model` and
# transformers load. See docs/finetuning.md.
#
# **Colab**: LoRA on gpt-oss-20b fits an L4 (with remat), an A100, an H100 or a TPU v5e / v6e chip (the runtime
# cell below prints its plan); not the free T4 (its 15 GB hold the model, not its training step). The model comes from `GPTOSS_MODEL` (default `openai/gpt-oss-20b`); CI runs this
# notebook on a tiny random checkpoint with a few steps.

# %%
import os
import subprocess
import sys

if "google.colab" in sys.modules:  # Colab only: JAX for the runtime's accelerator, then gptoss-jax
    source = os.environ.get("GPTOSS_JAX_SOURCE", "/content/gptoss-jax")
    accel = "tpu" if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ else "cuda12"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jax[{accel}]==0.10.2", source], check=True)

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
FT = RT.finetune or runtimes.Finetune(seq_len=256)  # no plan (CPU, a small checkpoint): the toy data's length
if RT.max_len is not None and RT.finetune is None:
    print("this runtime's plan says gpt-oss-20b LoRA does not fit: pick a larger runtime or a smaller model")

# %%
import json
import tempfile

import jax

import gptoss_jax as gj
from gptoss_jax.finetune import FinetuneConfig, finetune, render_example
from gptoss_jax.harmony import parse_completion, render_prompt
from gptoss_jax.lora import lora_info

MODEL = os.environ.get("GPTOSS_MODEL", "openai/gpt-oss-20b")
STEPS = int(os.environ.get("GPTOSS_FT_STEPS", "60"))
MAX_TOKENS = int(os.environ.get("GPTOSS_MAX_TOKENS", "128"))
WORK = os.environ.get("GPTOSS_WORKDIR") or tempfile.mkdtemp(prefix="gptoss-ft-")
print("JAX devices:", jax.devices(), "| work folder:", WORK)

# %% [markdown]
# ## 1. Data: JSONL, one conversation per line
# Each line is `{"messages": [{"role": ..., "content": ...}, ...]}` (optionally `"reasoning_effort"`,
# `"instructions"`, `"tools"`). Here: a toy task, answering in pirate speak.

# %%
pairs = [("What is the capital of France?", "Arr, 'tis Paris, matey!"),
         ("How many legs does a spider have?", "Eight legs, by Davy Jones' locker!"),
         ("What is 2 + 3?", "Five doubloons, savvy?"),
         ("Which planet is largest?", "Jupiter, the great whale o' the skies, arr!")]
data_path = os.path.join(WORK, "pirate.jsonl")
with open(data_path, "w") as f:
    for q, a in pairs:
        f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}], "reasoning_effort": "low"}) + "\n")

# %% [markdown]
# The conversation is rendered with harmony; the loss covers only what the assistant writes:

# %%
enc = gj.load_tokenizer()
ids, mask = render_example(json.loads(open(data_path).readline()))
print(f"{len(ids)} tokens, {mask.sum()} trained on:", repr(enc.decode(ids[mask].tolist())))

# %% [markdown]
# ## 2. Train
# `finetune` attaches rank-8 adapters to q/k/v/o (B = 0, so training starts from the base model exactly),
# trains them, checkpoints the training state to `OUT/train_state` (every `save_every` steps, async) and
# finally writes the merged model to `OUT`.

# %%
model = gj.load_model(MODEL, dtype=RT.dtype, kernels=RT.kernels)
before = render_prompt([{"role": "user", "content": pairs[0][0]}], reasoning_effort="low")

OUT = os.path.join(WORK, "pirate-lora")
# the toy conversations are short: 256 tokens hold them (the plan's sequence length bounds what fits)
cfg = FinetuneConfig(steps=STEPS, batch_size=1, grad_accum=2, seq_len=min(256, FT.seq_len), remat=FT.remat,
                     lr=2e-4 if STEPS > 20 else 1e-2, lora_rank=8, save_every=max(1, STEPS // 2), keep=2)
result = finetune(model, data_path, cfg, out_dir=OUT, resume=os.path.isdir(os.path.join(OUT, "train_state")))
print(f"loss {result.first_loss:.3f} -> {result.last_loss:.3f} in {result.step} steps;", lora_info(model))

# %%
print("checkpoints:", sorted(os.listdir(os.path.join(OUT, "train_state"))))
print("exported:", sorted(f for f in os.listdir(OUT) if f.endswith((".json", ".safetensors"))))

# %% [markdown]
# ## 3. Try it
# `model` still carries its adapters (trained); the export in `OUT` has them merged into the weights.

# %%
out = gj.generate(model, [before], max_new_tokens=MAX_TOKENS, temperature=0.0)
print("adapted model:", parse_completion(out.tokens[0, :out.lengths[0]]).final)

tuned = gj.load_model(OUT, dtype=RT.dtype, kernels=RT.kernels)
out = gj.generate(tuned, [before], max_new_tokens=MAX_TOKENS, temperature=0.0)
print("exported model:", parse_completion(out.tokens[0, :out.lengths[0]]).final)

# %% [markdown]
# ## 4. The same from the command line
# ```bash
# gptoss-jax aot --program finetune --target l4 --seq-len 1024 --remat     # does it fit? (no hardware needed)
# gptoss-jax finetune --model openai/gpt-oss-20b --data pirate.jsonl --steps 60 --lora-rank 8 --lr 2e-4 \
#     --batch-size 1 --grad-accum 2 --seq-len 256 --out pirate-lora --json
# gptoss-jax finetune ... --steps 120 --out pirate-lora --resume    # continue from the last checkpoint
# gptoss-jax chat --model pirate-lora
# ```
