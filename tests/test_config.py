"""Configs: presets equal the released files; YaRN equals both references; parameter totals."""

import json
import math
import os

import numpy as np
import pytest
import torch

from gptoss_jax.config import GptOssConfig, load_config, preset
from gptoss_jax.model import abstract_model, count_params

from helpers import REFERENCE

MODELS = {"gpt-oss-20b": (20_914_757_184, 13_761_264_768), "gpt-oss-120b": (116_829_156_672, 65_248_815_744)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_presets_equal_released_configs(name):
    hf = load_config(os.path.join(REFERENCE, name))
    orig = load_config(os.path.join(REFERENCE, name, "original"))
    assert hf == preset(name)
    # original/config.json differs only in what it cannot say (pad/eos ids)
    assert orig == preset(name).replace(pad_token_id=None, eos_token_id=None) or \
        orig.replace(pad_token_id=hf.pad_token_id, eos_token_id=hf.eos_token_id) == hf


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_shape_parameters_and_bytes(name):
    n_params, n_bytes = count_params(abstract_model(preset(name)))
    assert (n_params, n_bytes) == MODELS[name]
    with open(os.path.join(REFERENCE, name, "tensors.json")) as f:
        assert json.load(f)["total_bytes"] == n_bytes


def test_rope_parameters_form_is_accepted():
    with open(os.path.join(REFERENCE, "gpt-oss-20b", "config.json")) as f:
        d = json.load(f)
    rp = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    assert GptOssConfig.from_hf_dict({**d, "rope_parameters": rp}) == preset("gpt-oss-20b")


def test_layer_types_come_from_the_config():
    with open(os.path.join(REFERENCE, "gpt-oss-20b", "config.json")) as f:
        d = json.load(f)
    d["layer_types"] = ["full_attention"] * 24
    cfg = GptOssConfig.from_hf_dict(d)
    assert all(cfg.window(i) is None for i in range(24))
    d["layer_types"] = ["full_attention"] * 23
    with pytest.raises(ValueError, match="layer_types has 23 entries"):
        GptOssConfig.from_hf_dict(d)


def test_missing_key_is_named():
    with open(os.path.join(REFERENCE, "gpt-oss-20b", "config.json")) as f:
        d = json.load(f)
    del d["hidden_size"]
    with pytest.raises(ValueError, match="lacks the key 'hidden_size'"):
        GptOssConfig.from_hf_dict(d)


@pytest.mark.parametrize("head_dim", [8, 16, 24, 64])
def test_yarn_matches_transformers_and_openai(head_dim):
    from gpt_oss.torch.model import RotaryEmbedding
    from transformers import GptOssConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("gpt-oss-20b").replace(head_dim=head_dim)
    inv_freq, scaling = cfg.rope_tables()
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "quantization_config"})
    hf_inv, hf_scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    np.testing.assert_allclose(inv_freq, hf_inv.numpy(), rtol=1e-6)
    assert scaling == pytest.approx(hf_scaling)
    oa = RotaryEmbedding(head_dim, cfg.rope_theta, torch.float32, initial_context_length=4096,
                         scaling_factor=32.0, ntk_alpha=1.0, ntk_beta=32.0)
    conc, oa_inv = oa._compute_concentration_and_inv_freq()
    np.testing.assert_allclose(inv_freq, oa_inv.numpy(), rtol=1e-6)
    assert scaling == pytest.approx(conc) == pytest.approx(0.1 * math.log(32) + 1)
