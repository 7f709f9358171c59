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

from .errors import ConfigError, read_json_object

SLIDING = "sliding_attention"
FULL = "full_attention"

# transformers' GptOssConfig defaults for keys the released config.json does not spell out.
_HF_DEFAULTS = dict(swiglu_alpha=1.702, attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False)

# One rule per value: (kind, bound). "int": an integer >= bound; "real>": a finite number > bound;
# "real>=": a finite number >= bound; "bool"; "id": null or an integer >= 0; "ids": null, an id or a list of ids.
RULES: dict[str, tuple[str, float | None]] = {
    "vocab_size": ("int", 1), "hidden_size": ("int", 32), "intermediate_size": ("int", 32),
    "num_hidden_layers": ("int", 1), "num_attention_heads": ("int", 1), "num_key_value_heads": ("int", 1),
    "head_dim": ("int", 2), "num_local_experts": ("int", 1), "num_experts_per_tok": ("int", 1),
    "sliding_window": ("int", 1), "max_position_embeddings": ("int", 1),
    "rope_theta": ("real>", 1.0), "rms_norm_eps": ("real>", 0.0), "swiglu_limit": ("real>", 0.0),
    "swiglu_alpha": ("real>", 0.0), "attention_bias": ("bool", None), "tie_word_embeddings": ("bool", None),
    "pad_token_id": ("id", None), "eos_token_id": ("ids", None),
    # RopeScaling
    "factor": ("real>=", 1.0), "beta_fast": ("real>", 0.0), "beta_slow": ("real>", 0.0),
    "original_max_position_embeddings": ("int", 1), "truncate": ("bool", None),
}


def _show(v) -> str:
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_value(key: str, value, rule: tuple[str, float | None]):
    """`value` normalised (Python int / float / bool / tuple) or ConfigError naming `key`."""
    kind, bound = rule
    if kind == "int":
        if _is_int(value) and value >= bound:
            return int(value)
        raise ConfigError(f"{key} must be an integer >= {bound}, got {_show(value)}")
    if kind in ("real>", "real>="):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if ok and math.isfinite(value) and (value > bound if kind == "real>" else value >= bound):
            return float(value)
        raise ConfigError(f"{key} must be a finite number {kind[4:]} {bound}, got {_show(value)}")
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, got {_show(value)}")
    if kind == "id":
        if value is None or (_is_int(value) and value >= 0):
            return None if value is None else int(value)
        raise ConfigError(f"{key} must be null or a token id (an integer >= 0), got {_show(value)}")
    if kind == "ids":
        if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value):
            return tuple(int(v) for v in value)
        return check_value(key, value, ("id", None))
    raise AssertionError(kind)


_REQUIRED = object()


class _Reader:
    """get(key, rule_name=key, default=required): a checked value of a config dict, named by its key."""

    def __init__(self, d: dict, what: str):
        self.d, self.what = d, what

    def __call__(self, key: str, rule: str | None = None, default=_REQUIRED):
        if key not in self.d:
            if default is _REQUIRED:
                raise ConfigError(f"{self.what} lacks the key {key!r} needed for gpt-oss")
            return default
        return check_value(key, self.d[key], RULES[rule or key])


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (rope_type 'yarn') or none (rope_type 'default')."""

    rope_type: str = "yarn"
    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False

    def __post_init__(self):
        if not isinstance(self.rope_type, str):
            raise ConfigError(f"rope_type must be a string, got {_show(self.rope_type)}")
        for f in dataclasses.fields(self):
            if f.name != "rope_type":
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), RULES[f.name]))


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
        for f in dataclasses.fields(self):
            if f.name in RULES:
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), RULES[f.name]))
        if not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling, got {_show(self.rope_scaling)}")
        if not isinstance(self.layer_types, (list, tuple)) or not all(isinstance(t, str) for t in self.layer_types):
            raise ConfigError(f"layer_types must be a list of strings, got {_show(self.layer_types)}")
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
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
            raise ConfigError("invalid gpt-oss config: " + "; ".join(problems))

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
        """A Hugging Face config.json; every value is checked (type and range) and named by its key."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(d).__name__}")
        d = {**_HF_DEFAULTS, **d}
        get = _Reader(d, "config.json")
        if d.get("rope_parameters"):
            where, rp = "rope_parameters", d["rope_parameters"]
        else:
            where, rp = "rope_scaling", d.get("rope_scaling") or {"rope_type": "default"}
        if not isinstance(rp, dict):
            raise ConfigError(f"{where} must be an object or null, got {_show(rp)}")
        rp = dict(rp)
        theta = check_value(f"{where}.rope_theta", rp.pop("rope_theta"), RULES["rope_theta"]) \
            if "rope_theta" in rp else get("rope_theta")
        rope_type = rp.get("rope_type", rp.get("type", "yarn"))

        def rope(key, default, null_is_default=False):
            v = rp.get(key, default)
            return check_value(f"{where}.{key}", default if v is None and null_is_default else v, RULES[key])

        rope_scaling = RopeScaling(
            rope_type=rope_type, factor=rope("factor", 1.0), beta_fast=rope("beta_fast", 32.0, True),
            beta_slow=rope("beta_slow", 1.0, True),
            original_max_position_embeddings=rope("original_max_position_embeddings",
                                                  get("initial_context_length", "original_max_position_embeddings",
                                                      default=4096)),
            truncate=rope("truncate", True))  # transformers' default when absent
        n_layers = get("num_hidden_layers")
        layer_types = d.get("layer_types") or [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        head_dim = get("head_dim") if d.get("head_dim") is not None else hidden // heads
        k_key = "num_experts_per_tok" if "num_experts_per_tok" in d else "experts_per_token"
        return cls(
            vocab_size=get("vocab_size"), hidden_size=hidden, intermediate_size=get("intermediate_size"),
            num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads"),
            head_dim=head_dim, num_local_experts=get("num_local_experts"),
            num_experts_per_tok=get(k_key, "num_experts_per_tok"), sliding_window=get("sliding_window"),
            layer_types=layer_types, rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings"), rms_norm_eps=get("rms_norm_eps"),
            swiglu_limit=get("swiglu_limit"), swiglu_alpha=get("swiglu_alpha"),
            attention_bias=get("attention_bias"), tie_word_embeddings=get("tie_word_embeddings"),
            pad_token_id=get("pad_token_id", default=None), eos_token_id=get("eos_token_id", default=None),
        )

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        """OpenAI's original/config.json: even layers slide (their reference), no truncation of YaRN."""
        if not isinstance(d, dict):
            raise ConfigError(f"original config.json must hold a JSON object, got a {type(d).__name__}")
        get = _Reader(d, "original config.json")
        n_layers = get("num_hidden_layers")
        ctx = get("initial_context_length", "original_max_position_embeddings")
        factor = get("rope_scaling_factor", "factor", default=1.0)
        return cls(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"), num_hidden_layers=n_layers,
            num_attention_heads=get("num_attention_heads"), num_key_value_heads=get("num_key_value_heads"),
            head_dim=get("head_dim"), num_local_experts=get("num_experts", "num_local_experts"),
            num_experts_per_tok=get("experts_per_token", "num_experts_per_tok"),
            sliding_window=get("sliding_window"),
            layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers)),
            rope_theta=get("rope_theta"),
            rope_scaling=RopeScaling(
                rope_type="yarn" if factor > 1 else "default", factor=factor,
                beta_fast=get("rope_ntk_beta", "beta_fast", default=32.0),
                beta_slow=get("rope_ntk_alpha", "beta_slow", default=1.0),
                original_max_position_embeddings=ctx, truncate=False),
            max_position_embeddings=int(ctx * factor),
            swiglu_limit=get("swiglu_limit", default=7.0),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        """Either layout, told apart by their distinct key names."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got a {type(d).__name__}")
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
    """A config.json file, or a folder holding one (HF layout, original/ layout or converted).
    Any bad value raises ConfigError naming the file and the key."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no config.json at {p}")
    d = read_json_object(p, error=ConfigError)
    try:
        return GptOssConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def config_for(model: str) -> GptOssConfig:
    """A preset name (gpt-oss-20b, openai/gpt-oss-120b, ...), or a checkpoint folder / config.json."""
    if os.path.exists(model):
        return load_config(model)
    if model.split("/")[-1] in _PRESET_HF and model.count("/") <= 1 and not model.startswith((".", "/", "~")):
        return preset(model)
    if os.sep in model or model.endswith(".json") or model.startswith((".", "~")):
        raise FileNotFoundError(f"{model}: no such file or folder")
    raise ValueError(f"{model!r} is neither a file or folder nor a preset ({', '.join(sorted(_PRESET_HF))})")


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
        d = read_json_object(p, error=ConfigError) if os.path.exists(p) else {}
        try:
            eos = check_value("eos_token_id", d.get("eos_token_id", cfg.eos_token_id), RULES["eos_token_id"])
            top_p = check_value("top_p", d.get("top_p", 1.0), ("real>", 0.0))
            if top_p > 1:
                raise ConfigError(f"top_p must be in (0, 1], got {_show(top_p)}")
            top_k = d.get("top_k") or None  # transformers: 0 / null = off
            return cls(temperature=check_value("temperature", d.get("temperature", 1.0), ("real>=", 0.0)),
                       top_p=top_p, top_k=None if top_k is None else check_value("top_k", top_k, ("int", 1)),
                       stop_tokens=eos if isinstance(eos, tuple) else (() if eos is None else (eos,)))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
