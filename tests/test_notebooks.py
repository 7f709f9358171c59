"""The Colab notebooks: paired jupytext .py (source of truth) and .ipynb in sync, and each executed with
nbclient against a tiny random checkpoint with the full vocabulary (few tokens, few steps)."""

import os

import jupytext
import pytest

from gptoss_jax import write_random_checkpoint

from helpers import REPO, tiny_config

NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ["01_quickstart", "02_sharded_inference", "03_finetune_lora"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = tiny_config(vocab_size=201088, pad_token_id=199999, eos_token_id=200002, num_hidden_layers=2,
                      num_local_experts=4, num_experts_per_tok=2)
    path = str(tmp_path_factory.mktemp("nb") / "tiny-gpt-oss")
    write_random_checkpoint(cfg, path, seed=0, progress=False)
    return path


def _sources(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_generated_from_the_py(name):
    py = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
    ipynb = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"))
    assert _sources(ipynb) == _sources(py), f"regenerate: jupytext --to ipynb notebooks/{name}.py"
    install = [c.source for c in py.cells if "pip" in c.source and c.cell_type == "code"]
    assert install and all('if "google.colab" in sys.modules' in s for s in install)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tiny_checkpoint, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("GPTOSS_MODEL", tiny_checkpoint)
    monkeypatch.setenv("GPTOSS_MAX_TOKENS", "4")
    monkeypatch.setenv("GPTOSS_FT_STEPS", "3")
    monkeypatch.setenv("GPTOSS_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if name == "02_sharded_inference":
        monkeypatch.setenv("GPTOSS_CPU_DEVICES", "8")
    nb = jupytext.read(os.path.join(NOTEBOOKS, f"{name}.py"))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "runtime: CPU (cpu); dtype bfloat16, xla kernels" in text  # the runtime cell (gptoss_jax.runtimes)
    if name == "01_quickstart":
        assert "reasoning effort high" in text and "parameters in" in text
    elif name == "02_sharded_inference":
        assert "8 devices" in text and "expert=4" in text and "GiB of parameters" in text
    else:
        assert "loss " in text and "in 3 steps" in text and "exported model:" in text
        assert os.path.exists(tmp_path / "pirate-lora" / "config.json")
