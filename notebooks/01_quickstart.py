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
# # gpt-oss in JAX: quickstart
#
# Load **gpt-oss-20b** (MXFP4 experts kept packed: about 13.8 GB) and chat with it in the harmony format,
# at the three reasoning efforts.
#
# **Colab**: any GPU runtime (the free T4 included: float16, XLA kernels, up to 8192 tokens of context) or a
# TPU runtime, then run all cells.
# The install cell only runs on Colab; set `GPTOSS_JAX_SOURCE` to the gptoss-jax git URL
# (`git+https://github.com/ORG/gptoss-jax`) or upload a checkout to `/content/gptoss-jax`.
#
# The model comes from the environment variable `GPTOSS_MODEL` (default `openai/gpt-oss-20b`, a Hugging Face
# id or a local folder); CI runs this notebook on a tiny random checkpoint, which answers gibberish.

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

# %%
import jax

import gptoss_jax as gj
from gptoss_jax.harmony import parse_completion, render_prompt
from gptoss_jax.model import count_params

MODEL = os.environ.get("GPTOSS_MODEL", "openai/gpt-oss-20b")
MAX_TOKENS = int(os.environ.get("GPTOSS_MAX_TOKENS", "512"))
print("JAX devices:", jax.devices())

# %% [markdown]
# ## Load the model
# `load_model` takes a Hugging Face id (downloads only the safetensors and configs), a Hugging Face folder,
# an `original/` folder or a folder converted with `gptoss-jax convert`. The runtime's settings: the Pallas
# kernels on TPU and on GPUs from Ampere on, XLA elsewhere; bfloat16, or float16 on a T4.

# %%
model = gj.load_model(MODEL, dtype=RT.dtype, kernels=RT.kernels)
n_params, n_bytes = count_params(model)
print(f"{n_params / 1e9:.2f} B parameters in {n_bytes / 1e9:.2f} GB, {model.config.num_hidden_layers} layers")


# %% [markdown]
# ## Chat
# `render_prompt` builds the harmony prompt (system message with the reasoning effort, then the
# conversation); the model writes its reasoning on the `analysis` channel and the answer on `final`.


# %%
def chat(messages, effort="medium", max_tokens=MAX_TOKENS, temperature=0.7, seed=0):
    prompt = render_prompt(messages, reasoning_effort=effort)
    out = gj.generate(model, [prompt], max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                      prefill_chunk=RT.prefill_chunk)
    reply = parse_completion(out.tokens[0, :out.lengths[0]])
    return reply


question = [{"role": "user", "content": "How many r's are in the word strawberry?"}]
for effort in ("low", "medium", "high"):
    reply = chat(question, effort)
    print(f"--- reasoning effort {effort} ---")
    print("reasoning:", reply.analysis[:500])
    print("answer:   ", reply.final)

# %% [markdown]
# ## Multi-turn
# Earlier answers go back in as assistant messages (their reasoning is dropped, as harmony recommends).

# %%
conversation = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
reply = chat(conversation, "low")
conversation += [{"role": "assistant", "content": reply.final or ""},
                 {"role": "user", "content": "And of Italy?"}]
print(chat(conversation, "low").final)

# %% [markdown]
# ## Streaming and the command line
# `gj.generate_stream` yields tokens as they are sampled. From a terminal:
#
# ```bash
# gptoss-jax generate --prompt "Why is the sky blue?" --reasoning-effort high --show-reasoning
# gptoss-jax chat
# ```

# %%
enc = gj.load_tokenizer()
prompt = render_prompt([{"role": "user", "content": "Say hello."}], reasoning_effort="low")
pieces = []
for tok in gj.generate_stream(model, [prompt], max_new_tokens=min(MAX_TOKENS, 32), temperature=0.7):
    if int(tok[0]) in model.generation_defaults.stop_tokens:
        break
    pieces.append(int(tok[0]))
print(enc.decode(pieces))
