"""The runtimes Colab hands out, planned without them: the GPU target descriptions shipped in the
package (T4, L4, A100 40/80 GB, H100), what kernels="auto" / dtype="auto" pick per device, and small
deviceless plans (the real structure at tiny dimensions) for inference and fine-tuning on those GPUs and
on single TPU v5e / v6e chips, with the fit arithmetic checked. The full-size gpt-oss-20b / 120b plans
are produced by benchmarks/deployment_plans.py (minutes each), not here."""

import json

import jax
import numpy as np
import pytest

from gptoss_jax import aot
from gptoss_jax.runtime import Runtime, resolve_dtype, resolve_kernels
from pallas_kernels import gpu_targets
from pallas_kernels.impl import Impl

from helpers import tiny_config

# name: (SMs, compute capability, memory the driver reports (bytes), bandwidth (B/s), smem per block opt-in)
SPECS = {
    "t4": (40, (7, 5), 15835660288, 320e9, 65536),
    "l4": (58, (8, 9), 23612293120, 300e9, 101376),
    "a100-40g": (108, (8, 0), 42505273344, 1555e9, 166912),
    "a100-80g": (108, (8, 0), 84987740160, 2039e9, 166912),
    "h100": (132, (9, 0), 84929347584, 3.35232e12, 232448),
}
# what load_model(kernels="auto", dtype="auto") runs there, and the kernel body of its Pallas ops
AUTO = {"t4": ("xla", "float16", None), "l4": ("pallas", "bfloat16", Impl.TRITON),
        "a100-40g": ("pallas", "bfloat16", Impl.TRITON), "h100": ("pallas", "bfloat16", Impl.TRITON),
        "tpu-v5e": ("pallas", "bfloat16", Impl.MOSAIC), "tpu-v6e": ("pallas", "bfloat16", Impl.MOSAIC)}
GB = 1e9


def test_gpu_target_descriptions():
    """Every description parses to the vendor figures it cites (the test reads package data only)."""
    assert set(gpu_targets.TARGETS) == set(SPECS) and set(SPECS) <= set(aot.TARGETS)
    for name, (sms, cc, mem, bw, smem) in SPECS.items():
        info = gpu_targets.device_info(name)
        got = (info["core_count"], info["compute_capability"], info["device_memory_size"],
               info["memory_bandwidth"], info["shared_memory_per_block_optin"])
        assert got == (sms, cc, mem, bw, smem), name
        assert info["shared_memory_per_block"] <= info["shared_memory_per_block_optin"] <= info["shared_memory_per_core"]
        assert info["registers_per_block_limit"] == info["registers_per_core_limit"] == 65536
        t = aot.TARGETS[name]
        assert t.device_memory_bytes() == mem and t.hbm_bandwidth() == bw
        assert t.runtime_reserve_bytes(0.95) == round(mem * 0.05)


def test_tpu_reserves():
    v5e, v6e = aot.TARGETS["tpu-v5e"], aot.TARGETS["tpu-v6e"]
    assert v5e.device_memory_bytes() == 16 * 2 ** 30 and 0.25 * GB < v5e.runtime_reserve_bytes() < 0.3 * GB
    assert v6e.device_memory_bytes() == 32 * 2 ** 30 and 0.8 * GB < v6e.runtime_reserve_bytes() < 0.82 * GB


def test_ptxas_is_found_in_the_installed_nvcc_package():
    import importlib.util
    import os

    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None:
        pytest.skip("nvidia-cuda-nvcc-cu12 (the `aot` extra) not installed")
    path = gpu_targets.ptxas_path()
    assert path is not None and os.access(path, os.X_OK)
    assert any(path.startswith(loc) for loc in spec.submodule_search_locations)


def test_auto_on_cpu_is_xla_bfloat16():
    cpu = jax.devices("cpu")[0]
    assert resolve_kernels("auto", cpu) == "xla" and resolve_dtype("auto", cpu) == "bfloat16"
    assert resolve_kernels("pallas", cpu) == "pallas" and resolve_dtype("float32", cpu) == "float32"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("triton", cpu)
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", cpu)


@pytest.mark.aot
@pytest.mark.parametrize("target", sorted(AUTO))
def test_auto_choices_per_target(target):
    aot._setup_env()
    from gptoss_jax import sharding as shd

    device = aot.topology_devices(aot.TARGETS[target], 1)[0]
    kernels, dtype, impl = AUTO[target]
    assert (resolve_kernels("auto", device), resolve_dtype("auto", device)) == (kernels, dtype)
    rt = Runtime.create("auto", shd.make_mesh(devices=[device]))
    assert rt.kernels == kernels
    if impl is not None:  # the kernel body is fixed by the device, not by the (CPU) default backend
        assert rt.attention.impl is impl and rt.moe.impl is impl


# ---------------------------------------------------------------------------------------------
# Small deviceless plans
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "config.json"
    path.write_text(json.dumps(tiny_config().to_hf_dict()))
    return str(path)


def _check_fit(p, target):
    t = aot.TARGETS[target]
    for q in p["programs"].values():
        assert q["total_bytes_per_device"] == (q["argument_bytes"] + q["output_bytes"] - q["alias_bytes"]
                                               + q["temp_bytes"] + q["code_bytes"])
    assert p["total_bytes_per_device"] == max(q["total_bytes_per_device"] for q in p["programs"].values())
    assert p["device_memory_bytes"] == t.device_memory_bytes()
    assert p["usable_bytes"] == p["device_memory_bytes"] - p["runtime_reserve_bytes"] > 0
    assert p["fits"] == (p["total_bytes_per_device"] <= p["usable_bytes"])


@pytest.mark.aot
@pytest.mark.parametrize("target,calls", [("t4", ()), ("l4", ("__gpu$xla.gpu.triton",)),
                                          ("tpu-v6e", ("tpu_custom_call",))])
def test_inference_plan_per_target(tiny, target, calls):
    """One device of each kind: auto kernels and dtype, the real kernels in the compiled programs
    (Triton on sm_89, Mosaic on TPU, none on T4), the fit arithmetic and the decode bound."""
    p = aot.plan(target, tiny, devices=1, max_len=512, prefill_chunk=64)
    print(aot.format_plan(p))
    kernels, dtype, _ = AUTO[target]
    assert (p["kernels"], p["dtype"]) == (kernels, dtype) and p["fits"]
    _check_fit(p, target)
    for q in p["programs"].values():
        assert all(c in q["custom_calls"] for c in calls), q["custom_calls"]
        assert not any("triton" in c for c in q["custom_calls"]) or calls
    s = p["decode_bytes_per_step_per_device"]
    assert p["decode_tokens_per_s_bound"] == pytest.approx(aot.TARGETS[target].hbm_bandwidth() / s["total"])


@pytest.mark.aot
def test_t4_has_no_triton(tiny):
    """Why kernels="auto" is "xla" on a T4: XLA compiles no Triton (so no Pallas GPU kernel) below sm_80."""
    with pytest.raises(Exception, match="Triton support is only enabled for Ampere"):
        aot.plan("t4", tiny, devices=1, max_len=256, prefill_chunk=64, kernels="pallas", dtype="bfloat16",
                 programs=("decode",))


@pytest.mark.parametrize("kink", [0, 1])
def test_largest_context_search(monkeypatch, kink):
    """The search on a stand-in for the compiles: two programs whose memory grows linearly with the
    context at different rates (decode: the KV cache; prefill: also the scores of a chunk over the
    cache), the larger total binding; kink=1 adds a step the first two plans do not see, which the
    check compile catches and the search refines from."""
    usable, calls = 4_000_000_000, []

    def fake_plan(cfg, mesh, *, max_len, **kw):
        calls.append(max_len)
        prefill = 3_000_000_000 + 60_000 * max_len + (kink * 10 ** 8 if max_len > 10_000 else 0)
        decode = 3_400_000_000 + 25_000 * max_len
        return {"max_len": max_len, "programs": {"prefill": {"total_bytes_per_device": prefill},
                                                 "decode": {"total_bytes_per_device": decode}}}

    monkeypatch.setattr(aot, "plan_for_mesh", fake_plan)
    cfg = tiny_config(max_position_embeddings=131072)
    base = fake_plan(cfg, None, max_len=4096)
    mc = aot.largest_context(cfg, None, base, usable)
    # the prefill binds: 3.0e9 + 60e3 L (+1e8 past 10k) <= 4e9, in multiples of 256
    assert mc["max_len"] == (14848 if kink else 16640) and mc["total_bytes_per_device"] <= usable
    assert mc["compiles"] == len(calls) and calls[:2] == [4096, 2048] and len(calls) <= 5
    assert aot.largest_context(cfg, None, base, 10 ** 13)["max_len"] == 131072  # capped by the model's context
    none = aot.largest_context(cfg, None, base, 3 * 10 ** 9)  # not even the smallest plan fits
    assert none["max_len"] == 0 and "do not fit" in none["note"]


def test_largest_context_search_past_a_refused_compile(monkeypatch):
    """A context the compiler refuses (a kernel's scratch memory, not the HBM total) does not fit:
    the search bisects below it and reports it."""
    calls = []

    def fake_plan(cfg, mesh, *, max_len, **kw):
        calls.append(max_len)
        if max_len > 20_000:
            raise RuntimeError("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Ran out of memory in vmem")
        return {"max_len": max_len, "programs": {"decode": {"total_bytes_per_device": 10 ** 9 + 1000 * max_len}}}

    monkeypatch.setattr(aot, "plan_for_mesh", fake_plan)
    cfg = tiny_config(max_position_embeddings=131072)
    mc = aot.largest_context(cfg, None, fake_plan(cfg, None, max_len=4096), 2 * 10 ** 9)
    # linear reach: 10**6 tokens, capped at 131072: refused; then bisection 67584 (refused), 35840 (refused)
    assert calls[1:] == [2048, 131072, 67584, 35840]
    assert mc["max_len"] == 4096 and set(mc["refused"]) == {"131072", "67584", "35840"}
    assert "refused 35840 tokens" in mc["note"] and mc["compiles"] == 5


@pytest.mark.aot
def test_finetune_plans(tiny):
    """LoRA on one L4 (the Triton attention backward kernels), with and without remat; full
    fine-tuning of the dense weights on four H100s, expert + data parallel."""
    cfg = tiny_config()
    D, N, K, H, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.num_hidden_layers)
    r = 4
    lora_params = L * r * ((D + N * H) + 2 * (D + K * H) + (N * H + D))  # q, k, v, o: A and B
    plans = {}
    for remat in (False, True):
        plans[remat] = p = aot.plan_finetune("l4", tiny, devices=1, batch_size=2, seq_len=128, lora_rank=r,
                                             remat=remat)
        print(aot.format_plan(p))
        assert p["trainable_parameters"] == lora_params and p["kernels"] == "pallas" and p["fits"]
        _check_fit(p, "l4")
        assert "__gpu$xla.gpu.triton" in p["programs"]["train_step"]["custom_calls"]
        # the step returns the new adapters and both AdamW moments (f32, not donated)
        assert p["programs"]["train_step"]["output_bytes"] >= 3 * 4 * lora_params
    assert plans[True]["temp_bytes"] < plans[False]["temp_bytes"]

    full = aot.plan_finetune("h100", tiny, mesh_shape={"data": 2, "expert": 2}, batch_size=2, seq_len=64,
                             lora_rank=0, remat=True)
    print(aot.format_plan(full))
    assert full["mesh"] == {"data": 2, "expert": 2, "model": 1} and full["devices"] == 4
    dense = full["trainable_parameters"]
    assert full["kernels"] == "pallas" and full["fits"]
    # float32 master weights and two float32 moments of the dense parameters (replicated here)
    assert full["argument_bytes"] >= 3 * 4 * dense
    _check_fit(full, "h100")
    with pytest.raises(ValueError, match="not a multiple of the data axis"):
        aot.plan_finetune("h100", tiny, mesh_shape={"data": 2}, batch_size=3, seq_len=64)


@pytest.mark.aot
def test_cli_finetune_json(tiny):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "aot", "--program", "finetune", "--target", "t4",
                        "--model", tiny, "--seq-len", "64", "--batch-size", "1", "--lora-rank", "2", "--json"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["program"] == "finetune" and last["lora_rank"] == 2 and last["dtype"] == "float16"
    assert "LoRA rank 2" in r.stdout and "-> fits" in r.stdout
    assert np.isclose(last["gpu_mem_fraction"], aot.GPU_MEM_FRACTION)


def test_runtimes_detect_and_settings():
    """gptoss_jax.runtimes: the device kinds JAX reports on each runtime map to their plans; the plans
    pick what load_model's "auto" picks there; the memory fraction is set only when unset."""
    import types

    from gptoss_jax import runtimes

    kinds = {("gpu", "Tesla T4"): "t4", ("gpu", "NVIDIA L4"): "l4", ("gpu", "NVIDIA A100-SXM4-40GB"): "a100-40g",
             ("gpu", "NVIDIA A100-SXM4-80GB"): "a100-80g", ("gpu", "NVIDIA A100 80GB PCIe"): "a100-80g",
             ("gpu", "NVIDIA H100 80GB HBM3"): "h100", ("tpu", "TPU v5 lite"): "tpu-v5e",
             ("tpu", "TPU v6 lite"): "tpu-v6e", ("gpu", "NVIDIA L40S"): None, ("tpu", "TPU v4"): None}
    for (platform, kind), name in kinds.items():
        assert runtimes.target_of(types.SimpleNamespace(platform=platform, device_kind=kind)) == name, kind
    for name, plan in runtimes.PLANS.items():
        kernels, dtype, _ = AUTO.get(name, ("pallas", "bfloat16", None))
        assert (plan.kernels, plan.dtype) == (kernels, dtype) and name in aot.TARGETS, name
        assert plan.max_len is not None and plan.max_len % aot.CONTEXT_GRAIN == 0
    assert runtimes.PLANS["t4"].finetune is None  # 20b LoRA does not fit a T4 (see the README table)
    cpu = runtimes.detect(jax.devices("cpu")[0])
    assert cpu.name == "cpu" and cpu.max_len is None and "runtime: CPU (cpu)" in cpu.describe()
    assert "does not fit" in runtimes.PLANS["t4"].describe() and "8192" in runtimes.PLANS["t4"].describe()
    env = {}
    assert runtimes.use_planned_memory_fraction(env) == str(aot.GPU_MEM_FRACTION) == env[runtimes.MEM_FRACTION_VAR]
    env = {runtimes.MEM_FRACTION_VAR: ".8"}
    assert runtimes.use_planned_memory_fraction(env) == ".8"  # the user's choice stands


def test_a_program_the_compiler_refuses_is_a_plan_that_does_not_fit():
    """The TPU compiler refuses a program larger than HBM: the plan records the arguments and the
    temporaries it reports (and fits=False follows); any other compile error is raised."""
    import time

    import jax.numpy as jnp

    class Lowered:
        def __init__(self, msg):
            self.msg = msg

        def compile(self):
            raise RuntimeError(self.msg)

    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = (jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=sharding),)
    refused = Lowered("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                      "temporaries (27.18G) exceeds available HBM (15.75G).")
    rec = aot._program(refused, args, time.perf_counter())
    assert rec["temp_bytes"] == int(27.18 * 2 ** 30) and rec["argument_bytes"] == 2 * 2 ** 20
    assert rec["total_bytes_per_device"] == rec["argument_bytes"] + rec["temp_bytes"]
    assert "RESOURCE_EXHAUSTED" in rec["compile_error"]
    p = {"total_bytes_per_device": rec["total_bytes_per_device"]}
    assert not aot._fit(aot.TARGETS["tpu-v5e"], p["total_bytes_per_device"], aot.GPU_MEM_FRACTION)["fits"]
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        aot._program(Lowered("INVALID_ARGUMENT: something else"), args, time.perf_counter())
