"""An installed wheel plans for every target: the GPU target descriptions are package data, not files
beside the development checkout. The wheel is built from a copy of the sources (the checkout stays
clean), installed with --target into a folder outside the checkout, and run from there with the venv
supplying jax (PYTHONPATH points at the folder only; the working directory is a fresh one)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from gptoss_jax.config import preset

from helpers import REPO

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for pkg in ("gptoss_jax", "pallas_kernels"):
        shutil.copytree(os.path.join(REPO, pkg), src / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "test_*.py"))
    wheels, site = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("gptoss_jax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return site


def _run(site, cwd, *args):
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_wheel_plans_every_gpu_target(installed, tmp_path):
    r = _run(installed, tmp_path, "-c", "import json, gptoss_jax, pallas_kernels.gpu_targets as g; print(json.dumps("
             "[gptoss_jax.__file__, {n: g.device_info(n)['device_memory_size'] for n in g.TARGETS}]))")
    assert r.returncode == 0, r.stderr[-3000:]
    where, sizes = json.loads(r.stdout.strip().splitlines()[-1])
    assert where.startswith(str(installed)) and not where.startswith(REPO)  # the installed copy ran
    assert set(sizes) == {"h100", "a100-80g", "a100-40g", "l4", "t4"} and sizes["h100"] == 84929347584

    cfg = preset("gpt-oss-20b").replace(num_hidden_layers=1, layer_types=("full_attention",), vocab_size=1024,
                                        num_local_experts=4, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    r = _run(installed, tmp_path, "-m", "gptoss_jax.cli", "aot", "--target", "h100", "--model", "config.json",
             "--kernels", "xla", "--max-len", "256", "--prefill-chunk", "64", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["device_kind"] == "NVIDIA H100 80GB HBM3" and plan["device_memory_bytes"] == 84929347584
    assert plan["fits"] is True and set(plan["programs"]) == {"prefill", "decode"}
