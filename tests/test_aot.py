"""Deviceless deployment plans (`gptoss-jax aot`): the real prefill and decode programs compiled for
H100 (JAX CUDA plugin + target config) and TPU (libtpu topologies) from abstract shapes only.

Each plan is compiled once per module (the compiles dominate: ~1 min for 20b on H100, several on TPU).
"""

import json
import os
import subprocess
import sys

import pytest

from gptoss_jax import aot
from gptoss_jax.config import preset
from gptoss_jax.model import abstract_model, count_params

pytestmark = pytest.mark.aot

GB = 1e9
_PLANS = {}


def _plan(target, model, **kw):
    key = (target, model, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _PLANS:
        _PLANS[key] = aot.plan(target, model, **kw)
        print(aot.format_plan(_PLANS[key]))
    return _PLANS[key]


def _param_bytes(name):
    return count_params(abstract_model(preset(name)))[1]


def test_20b_fits_one_h100_at_8k():
    p = _plan("h100", "gpt-oss-20b", devices=1, batch=1, max_len=8192, kernels="xla")
    params = _param_bytes("gpt-oss-20b")
    assert 13.5 * GB < params < 14.0 * GB  # MXFP4 packed on device
    # arguments = parameters + the bf16 KV cache (12 full layers x 8192 slots + 12 rings of 128)
    assert params < p["argument_bytes"] < params + 0.5 * GB
    assert p["device_memory_bytes"] == 84929347584  # from the H100 target description
    assert p["usable_bytes"] == p["device_memory_bytes"] - round(0.05 * 84929347584)  # mem fraction 0.95
    assert p["fits"] and p["total_bytes_per_device"] < 25 * GB
    assert p["programs"]["decode"]["temp_bytes"] < 1 * GB  # decode gathers only the routed experts


def test_20b_fits_one_tpu_v5e_chip_at_8k():
    # the Pallas path, what kernels="auto" runs on a TPU (its compile is also 2x faster than XLA's here)
    p = _plan("tpu-v5e", "gpt-oss-20b", devices=1, batch=1, max_len=8192, kernels="pallas")
    assert 13.5 * GB < p["argument_bytes"] < 14.5 * GB  # kernel layout: +1.4% K padding over 13.97 GB
    assert p["device_memory_bytes"] == 16 * 2 ** 30
    # activations and one chunk's attention, never a dequantized expert layer
    assert p["temp_bytes"] < 2.5 * GB
    assert p["fits"], p


def test_120b_fits_one_h100_at_8k():
    p = _plan("h100", "gpt-oss-120b", devices=1, batch=1, max_len=8192, kernels="xla")
    params = _param_bytes("gpt-oss-120b")
    assert params < p["argument_bytes"] < params + 0.6 * GB
    assert p["fits"], p


def test_120b_fits_tpu_v5e_8_expert_parallel():
    p = _plan("tpu-v5e", "gpt-oss-120b", mesh_shape={"expert": 8}, batch=1, max_len=8192, kernels="pallas")
    cfg = preset("gpt-oss-120b")
    total = _param_bytes("gpt-oss-120b")
    E, D, F = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    expert_bytes = cfg.num_hidden_layers * E * (2 * F * D // 2 + 2 * F * D // 32 + D * F // 2 + D * F // 32
                                                + 2 * (2 * F + D))
    dense = total - expert_bytes
    # per device: 1/8 of the experts (kernel layout: K padded 2880 -> 2944) + the replicated dense
    # weights + the cache
    padded = -(-D // 128) * 128
    assert dense + expert_bytes / 8 < p["argument_bytes"] < dense + expert_bytes / 8 * padded / D + 0.6 * GB
    assert p["argument_bytes"] < total / 4
    assert p["fits"], p


def test_pallas_plan_compiles_the_kernels_with_the_kernel_layout(tmp_path):
    """--kernels pallas on H100 (2 layers of 20b): the Triton kernels compile in both programs (not their
    interpreted form: the plan runs on the CPU backend), and the arguments are the XLA plan's plus exactly
    the kernel layout's K padding (2880 -> 2944)."""
    cfg = preset("gpt-oss-20b").replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    px = _plan("h100", str(path), devices=1, batch=1, max_len=4096, kernels="xla")
    pp = _plan("h100", str(path), devices=1, batch=1, max_len=4096, kernels="pallas")
    D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    pad = lambda k: -(-k // 128) * 128 - k  # noqa: E731
    per_weight = 0.5 + 1 / 32  # bytes: a nibble plus a shared E8M0 scale per 32
    delta = cfg.num_hidden_layers * E * (2 * F * pad(D) + D * pad(F)) * per_weight
    assert pp["kernels"] == "pallas" and pp["argument_bytes"] - px["argument_bytes"] == delta
    assert pp["fits"] and set(pp["programs"]) == {"prefill", "decode"}
    for name in ("prefill", "decode"):
        assert "__gpu$xla.gpu.triton" in pp["programs"][name]["custom_calls"]
        assert not any("triton" in c for c in px["programs"][name]["custom_calls"])


def test_cli_json_last_line(tmp_path):
    """The subcommand end to end on a small config (fast compile): last line is one JSON object."""
    cfg = preset("gpt-oss-20b").replace(num_hidden_layers=2, layer_types=("sliding_attention", "full_attention"))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "aot", "--target", "h100", "--model", str(path),
                        "--mesh", "expert=2", "--batch", "2", "--max-len", "1024", "--json"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("argument_bytes", "temp_bytes", "total_bytes_per_device", "device_memory_bytes", "fits"):
        assert k in last
    assert last["fits"] is True and last["mesh"] == {"data": 1, "expert": 2, "model": 1}
    assert last["total_bytes_per_device"] >= last["argument_bytes"] + last["temp_bytes"] - last["programs"]["decode"][
        "alias_bytes"] - 1
    assert "-> fits" in r.stdout  # the human-readable plan precedes the JSON line
