"""Model configuration: one frozen dataclass, read from the released config files.

Accepted sources: a Hugging Face `config.json` (old `rope_scaling` + `rope_theta`, or newer
`rope_parameters`), OpenAI's `original/config.json`, or a preset name. Everything the layers use
comes from here; nothing about gpt-oss is hard-coded in the layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

SLIDING = "sliding_attention"
FULL = "full_attention"

# transformers' GptOssConfig defaults for keys the released config.json does not spell out.
_HF_DEFAULTS = dict(swiglu_alpha=1.702, attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (rope_type 'yarn') or none (rope_type 'default')."""

    rope_type: str = "yarn"
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 199999
    eos_token_id: int | tuple[int, ...] | None = 200002

    def __post_init__(self):
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            problems.append(f"unknown layer types {bad} (expected {SLIDING!r} or {FULL!r})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} not in [1, {self.num_local_experts}]")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name} {getattr(self, name)} must be a multiple of 32 (MXFP4 blocks)")
        if self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even (half-split RoPE)")
        if self.rope_scaling.rope_type not in ("yarn", "default"):
            problems.append(f"rope_type {self.rope_scaling.rope_type!r} is not supported (yarn or default)")
        if problems:
            raise ValueError("invalid gpt-oss config: " + "; ".join(problems))

    # ---- derived -------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def window(self, layer: int) -> int | None:
        """Keys visible to a query on this layer (including itself); None = full causal."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_tables(self) -> tuple[np.ndarray, float]:
        """(inv_freq [head_dim/2] float32, attention_scaling) exactly as transformers' YaRN.

        `truncate: false` keeps the fractional correction range, as OpenAI's reference does; the
        concentration factor (attention_scaling) multiplies both cos and sin.
        """
        dim = self.head_dim
        base = float(self.rope_theta)
        pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        rs = self.rope_scaling
        if rs.rope_type == "default":
            return (1.0 / pos_freqs).astype(np.float32), 1.0
        factor = rs.factor
        attention_scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction_dim(rot):
            return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = 1.0 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq.astype(np.float32), float(attention_scaling)

    # ---- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        d = {**_HF_DEFAULTS, **d}
        try:
            if "rope_parameters" in d and d["rope_parameters"]:
                rp = dict(d["rope_parameters"])
                theta = rp.pop("rope_theta", d.get("rope_theta"))
            else:
                rp = dict(d.get("rope_scaling") or {"rope_type": "default"})
                theta = d["rope_theta"]
            rp.setdefault("rope_type", rp.pop("type", "yarn"))
            rope = RopeScaling(
                rope_type=rp["rope_type"],
                factor=float(rp.get("factor", 1.0)),
                beta_fast=float(rp.get("beta_fast") or 32.0),
                beta_slow=float(rp.get("beta_slow") or 1.0),
                original_max_position_embeddings=int(rp.get("original_max_position_embeddings",
                                                            d.get("initial_context_length", 4096))),
                truncate=bool(rp.get("truncate", True)),  # transformers' default when absent
            )
            n_layers = int(d["num_hidden_layers"])
            layer_types = d.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
            eos = d.get("eos_token_id")
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d["num_key_value_heads"]),
                head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
                num_local_experts=int(d["num_local_experts"]),
                num_experts_per_tok=int(d.get("num_experts_per_tok", d.get("experts_per_token"))),
                sliding_window=int(d["sliding_window"]),
                layer_types=tuple(layer_types),
                rope_theta=float(theta),
                rope_scaling=rope,
                max_position_embeddings=int(d["max_position_embeddings"]),
                rms_norm_eps=float(d["rms_norm_eps"]),
                swiglu_limit=float(d["swiglu_limit"]),
                swiglu_alpha=float(d["swiglu_alpha"]),
                attention_bias=bool(d["attention_bias"]),
                tie_word_embeddings=bool(d["tie_word_embeddings"]),
                pad_token_id=d.get("pad_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the key {e.args[0]!r} needed for gpt-oss") from None

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        """OpenAI's original/config.json: even layers slide (their reference), no truncation of YaRN."""
        try:
            n_layers = int(d["num_hidden_layers"])
            ctx = int(d["initial_context_length"])
            factor = float(d.get("rope_scaling_factor", 1.0))
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=int(d["num_attention_heads"]),
                num_key_value_heads=int(d["num_key_value_heads"]),
                head_dim=int(d["head_dim"]),
                num_local_experts=int(d["num_experts"]),
                num_experts_per_tok=int(d["experts_per_token"]),
                sliding_window=int(d["sliding_window"]),
                layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers)),
                rope_theta=float(d["rope_theta"]),
                rope_scaling=RopeScaling(
                    rope_type="yarn" if factor > 1 else "default",
                    factor=factor,
                    beta_fast=float(d.get("rope_ntk_beta", 32.0)),
                    beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
                    original_max_position_embeddings=ctx,
                    truncate=False,
                ),
                max_position_embeddings=int(ctx * factor),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except KeyError as e:
            raise ValueError(f"original config.json lacks the key {e.args[0]!r} needed for gpt-oss") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        """Either layout, told apart by their distinct key names."""
        return cls.from_original_dict(d) if "num_experts" in d and "num_local_experts" not in d else cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        rs = self.rope_scaling
        rope = None if rs.rope_type == "default" else {
            "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "rope_type": rs.rope_type, "truncate": rs.truncate,
        }
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "attention_bias": self.attention_bias, "attention_dropout": 0.0, "eos_token_id": eos,
            "experts_per_token": self.num_experts_per_tok, "head_dim": self.head_dim, "hidden_act": "silu",
            "hidden_size": self.hidden_size, "initial_context_length": rs.original_max_position_embeddings,
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types), "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads, "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers, "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts, "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "quantization_config": {
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps, "rope_scaling": rope, "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9, "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit, "swiglu_alpha": self.swiglu_alpha,
            "tie_word_embeddings": self.tie_word_embeddings, "use_cache": True, "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        rs = self.rope_scaling
        return {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window, "initial_context_length": rs.original_max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling_factor": rs.factor,
            "rope_ntk_alpha": rs.beta_slow, "rope_ntk_beta": rs.beta_fast,
        }

    def replace(self, **kw) -> "GptOssConfig":
        return dataclasses.replace(self, **kw)


def load_config(path: str | os.PathLike) -> GptOssConfig:
    """A config.json file, or a folder holding one (HF layout, original/ layout or converted)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no config.json at {p}")
    try:
        with open(p) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    return GptOssConfig.from_dict(d)


_PRESET_HF = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
}


def preset(name: str) -> GptOssConfig:
    """The released configurations (equal to the released config.json files)."""
    name = name.split("/")[-1]
    if name not in _PRESET_HF:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(_PRESET_HF)}")
    kw = _PRESET_HF[name]
    n = kw["num_hidden_layers"]
    return GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=n,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        num_local_experts=kw["num_local_experts"], num_experts_per_tok=4, sliding_window=128,
        layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n)),
        rope_theta=150000.0, rope_scaling=RopeScaling(), max_position_embeddings=131072,
        rms_norm_eps=1e-5, swiglu_limit=7.0, swiglu_alpha=1.702, pad_token_id=199999, eos_token_id=200002,
    )


PRESETS = tuple(_PRESET_HF)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults of a checkpoint (its generation_config.json; absent keys as transformers)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop_tokens: tuple[int, ...] = ()

    @classmethod
    def load(cls, folder: str | os.PathLike, cfg: GptOssConfig) -> "GenerationDefaults":
        p = os.path.join(os.fspath(folder), "generation_config.json")
        d = {}
        if os.path.exists(p):
            with open(p) as f:
                d = json.load(f)
        eos = d.get("eos_token_id", cfg.eos_token_id)
        stops = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(temperature=float(d.get("temperature", 1.0)), top_p=float(d.get("top_p", 1.0)),
                   top_k=d.get("top_k") or None, stop_tokens=stops)
