"""Tiny gpt-oss configurations and the two independent references (transformers, OpenAI)."""

from __future__ import annotations

import os

import numpy as np

from gptoss_jax.config import FULL, SLIDING, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
REFERENCE = os.path.join(SHARED, "reference")


def tiny_config(**kw):
    """A small gpt-oss: the released YaRN (original_max_position_embeddings 4096), small dims."""
    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                num_experts_per_tok=3, sliding_window=16, layer_types=(SLIDING, FULL, SLIDING),
                pad_token_id=None, eos_token_id=None)
    base.update(kw)
    if "num_hidden_layers" in kw and "layer_types" not in kw:
        base["layer_types"] = tuple(SLIDING if i % 2 == 0 else FULL for i in range(kw["num_hidden_layers"]))
    return preset("gpt-oss-20b").replace(**base)


# name -> (config, sequence length): odd head dims, GQA 4/8/1, single kv head, top-k < experts,
# vocab not a power of two, windows shorter than the sequence (128 with T >= 300 included).
PARITY_CONFIGS = {
    "gqa4_w16": (tiny_config(), 50),
    "kv1_h24_w128": (tiny_config(vocab_size=1111, hidden_size=96, intermediate_size=64, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=24, num_local_experts=4, num_experts_per_tok=2,
                                 sliding_window=128, num_hidden_layers=2, layer_types=(FULL, SLIDING)), 300),
    "mha_w7": (tiny_config(vocab_size=777, hidden_size=32, intermediate_size=32, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, num_local_experts=6, num_experts_per_tok=4,
                           sliding_window=7, num_hidden_layers=2, layer_types=(SLIDING, SLIDING)), 40),
}


def checkpoint_fixtures(cfg, name: str, seed: int, num_shards: int | None = None):
    """Module-scoped pytest fixtures `(ckpt, model)`: a random checkpoint of `cfg` in the released
    layout and its float32 XLA model. Assign them at module level: `ckpt, model = checkpoint_fixtures(...)`."""
    import pytest

    from gptoss_jax import load_model, write_random_checkpoint

    @pytest.fixture(scope="module")
    def ckpt(tmp_path_factory):
        path = str(tmp_path_factory.mktemp(name) / "hf")
        write_random_checkpoint(cfg, path, num_shards=num_shards, seed=seed, progress=False)
        return path

    @pytest.fixture(scope="module")
    def model(ckpt):
        return load_model(ckpt, dtype="float32", kernels="xla", progress=False)

    return ckpt, model


def subprocess_env() -> dict:
    """Environment for a test subprocess that sets its own CPU device count (tests/*_checks.py)."""
    here = os.path.join(REPO, "tests")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [REPO, here, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return env


def run_two_processes(script, mode, args, timeout=300):
    """`python script mode I PORT *args` for I in 0, 1 (jax.distributed on a free local port);
    asserts both exit 0, killing both when one hangs."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, script, mode, str(i), str(port), *args], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def random_ids(cfg, batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, length)).astype(np.int32)


def hf_reference(path):
    """transformers' GptOssForCausalLM, experts dequantized, float32, eager attention."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def openai_logits(path, ids):
    """OpenAI's reference torch implementation (gpt_oss.torch), cast to float32, one row at a time."""
    import torch
    from gpt_oss.torch.model import Transformer

    model = Transformer.from_checkpoint(path, device="cpu").float().eval()
    with torch.no_grad():
        return np.stack([model(torch.from_numpy(np.asarray(row, np.int64))).float().numpy() for row in ids])


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
