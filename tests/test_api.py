"""Public API argument checking."""

import numpy as np
import pytest

from gptoss_jax import load_model, write_random_checkpoint

from helpers import tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("api") / "hf")
    write_random_checkpoint(tiny_config(num_hidden_layers=1), path, progress=False)
    return path


def test_bad_kernels_and_dtype(ckpt):
    with pytest.raises(ValueError, match="kernels must be one of"):
        load_model(ckpt, kernels="cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(ckpt, dtype="float8", kernels="xla")


def test_auto_kernels_on_cpu_is_xla(ckpt):
    m = load_model(ckpt, kernels="auto", progress=False)  # and dtype="auto": bfloat16 on CPU
    assert m.kernels == "xla" and m.dtype == np.dtype("bfloat16")


def test_model_call_checks_token_ids(ckpt):
    model = load_model(ckpt, dtype="float32", kernels="xla", progress=False)
    with pytest.raises(ValueError, match=r"token id 1000 at \[0, 1\] is out of range \[0, 1000\)"):
        model(np.array([[1, 1000]]))
    with pytest.raises(ValueError, match="shape"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        model(np.array([[1.0, 2.0]]))
