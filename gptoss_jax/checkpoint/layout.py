"""The release layout tables: every tensor of a Hugging Face or OpenAI `original/` checkpoint with
its shape, dtype and the map to and from our parameters, the released shard names, and layout
detection of a local folder. Reading, validating, writing and exporting all use `tensor_specs`."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from pallas_kernels import mxfp4

from ..config import GptOssConfig
from ..errors import CheckpointError, ConfigError, read_json_object
from ..params import ParamPath
from .safetensors_io import nbytes

ORBAX_MARKER = "gptoss_jax.json"
HF_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    params: tuple[ParamPath, ...]
    to_params: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # file tensor -> our params
    from_params: Callable[..., np.ndarray]  # our params -> file tensor
    kind: str = "dense"  # dense | norm | bias | sink | router | blocks | scales


def _ident(x):
    return (x,)


def _ident_back(x):
    return x


def tensor_specs(cfg: GptOssConfig, layout: str = "hf") -> list[TensorSpec]:
    """Every tensor of the released checkpoint for `cfg`, in release order."""
    if layout not in ("hf", "original"):
        raise ValueError(f"layout must be 'hf' or 'original', got {layout!r}")
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, F, V = cfg.num_local_experts, cfg.intermediate_size, cfg.vocab_size
    gd, gf, nb = D // mxfp4.BLOCK, F // mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK
    bf = "BF16"

    def S(name, shape, params, to=_ident, back=_ident_back, dtype=bf, kind="dense"):
        return TensorSpec(name, tuple(shape), dtype, tuple(params), to, back, kind)

    # [out = heads*H, D] <-> [D, heads, H]; [heads*H] <-> [heads, H]; o: [D, N*H] <-> [N, H, D]
    def w_in(n):
        return (lambda x: (x.reshape(n, H, D).transpose(2, 0, 1),), lambda p: p.transpose(1, 2, 0).reshape(n * H, D))

    def b_in(n):
        return (lambda x: (x.reshape(n, H),), lambda p: p.reshape(n * H))

    wo = (lambda x: (x.reshape(D, N, H).transpose(1, 2, 0),), lambda p: p.transpose(2, 0, 1).reshape(D, N * H))
    tr = (lambda x: (x.T,), lambda p: p.T)

    specs = []
    if layout == "hf":
        specs += [S("model.embed_tokens.weight", (V, D), [("embed_VD",)]),
                  S("model.norm.weight", (D,), [("norm",)], kind="norm"),
                  S("lm_head.weight", (V, D), [("lm_head_VD",)])]
        for i in range(cfg.num_hidden_layers):
            p, a, m = f"model.layers.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
            specs += [
                S(p + "input_layernorm.weight", (D,), [a + ("norm",)], kind="norm"),
                S(p + "post_attention_layernorm.weight", (D,), [m + ("norm",)], kind="norm"),
                S(p + "self_attn.q_proj.weight", (N * H, D), [a + ("wq_DNH",)], *w_in(N)),
                S(p + "self_attn.q_proj.bias", (N * H,), [a + ("bq_NH",)], *b_in(N), kind="bias"),
                S(p + "self_attn.k_proj.weight", (K * H, D), [a + ("wk_DKH",)], *w_in(K)),
                S(p + "self_attn.k_proj.bias", (K * H,), [a + ("bk_KH",)], *b_in(K), kind="bias"),
                S(p + "self_attn.v_proj.weight", (K * H, D), [a + ("wv_DKH",)], *w_in(K)),
                S(p + "self_attn.v_proj.bias", (K * H,), [a + ("bv_KH",)], *b_in(K), kind="bias"),
                S(p + "self_attn.o_proj.weight", (D, N * H), [a + ("wo_NHD",)], *wo),
                S(p + "self_attn.o_proj.bias", (D,), [a + ("bo_D",)], kind="bias"),
                S(p + "self_attn.sinks", (N,), [a + ("sinks_N",)], kind="sink"),
                S(p + "mlp.router.weight", (E, D), [m + ("wr_DE",)], *tr, kind="router"),
                S(p + "mlp.router.bias", (E,), [m + ("br_E",)], kind="bias"),
                S(p + "mlp.experts.gate_up_proj_blocks", (E, 2 * F, gd, nb), [m + ("w1_blocks",)], dtype="U8",
                  kind="blocks"),
                S(p + "mlp.experts.gate_up_proj_scales", (E, 2 * F, gd), [m + ("w1_scales",)], dtype="U8",
                  kind="scales"),
                S(p + "mlp.experts.gate_up_proj_bias", (E, 2 * F), [m + ("b1",)], kind="bias"),
                S(p + "mlp.experts.down_proj_blocks", (E, D, gf, nb), [m + ("w2_blocks",)], dtype="U8",
                  kind="blocks"),
                S(p + "mlp.experts.down_proj_scales", (E, D, gf), [m + ("w2_scales",)], dtype="U8", kind="scales"),
                S(p + "mlp.experts.down_proj_bias", (E, D), [m + ("b2",)], kind="bias"),
            ]
        return specs

    # OpenAI original layout: fused qkv (rows q | k | v), mlp1 = gate/up, mlp2 = down.
    nq, nk = N * H, K * H
    qkv_w = (lambda x: (x[:nq].reshape(N, H, D).transpose(2, 0, 1), x[nq:nq + nk].reshape(K, H, D).transpose(2, 0, 1),
                        x[nq + nk:].reshape(K, H, D).transpose(2, 0, 1)),
             lambda q, k, v: np.concatenate([q.transpose(1, 2, 0).reshape(nq, D), k.transpose(1, 2, 0).reshape(nk, D),
                                             v.transpose(1, 2, 0).reshape(nk, D)]))
    qkv_b = (lambda x: (x[:nq].reshape(N, H), x[nq:nq + nk].reshape(K, H), x[nq + nk:].reshape(K, H)),
             lambda q, k, v: np.concatenate([q.reshape(nq), k.reshape(nk), v.reshape(nk)]))
    specs += [S("embedding.weight", (V, D), [("embed_VD",)]),
              S("norm.scale", (D,), [("norm",)], kind="norm"),
              S("unembedding.weight", (V, D), [("lm_head_VD",)])]
    for i in range(cfg.num_hidden_layers):
        p, a, m = f"block.{i}.", ("blocks", i, "attn"), ("blocks", i, "mlp")
        specs += [
            S(p + "attn.norm.scale", (D,), [a + ("norm",)], kind="norm"),
            S(p + "attn.qkv.weight", (nq + 2 * nk, D), [a + ("wq_DNH",), a + ("wk_DKH",), a + ("wv_DKH",)], *qkv_w),
            S(p + "attn.qkv.bias", (nq + 2 * nk,), [a + ("bq_NH",), a + ("bk_KH",), a + ("bv_KH",)], *qkv_b,
              kind="bias"),
            S(p + "attn.sinks", (N,), [a + ("sinks_N",)], kind="sink"),
            S(p + "attn.out.weight", (D, nq), [a + ("wo_NHD",)], *wo),
            S(p + "attn.out.bias", (D,), [a + ("bo_D",)], kind="bias"),
            S(p + "mlp.norm.scale", (D,), [m + ("norm",)], kind="norm"),
            S(p + "mlp.gate.weight", (E, D), [m + ("wr_DE",)], *tr, kind="router"),
            S(p + "mlp.gate.bias", (E,), [m + ("br_E",)], kind="bias"),
            S(p + "mlp.mlp1_weight.blocks", (E, 2 * F, gd, nb), [m + ("w1_blocks",)], dtype="U8", kind="blocks"),
            S(p + "mlp.mlp1_weight.scales", (E, 2 * F, gd), [m + ("w1_scales",)], dtype="U8", kind="scales"),
            S(p + "mlp.mlp1_bias", (E, 2 * F), [m + ("b1",)], kind="bias"),
            S(p + "mlp.mlp2_weight.blocks", (E, D, gf, nb), [m + ("w2_blocks",)], dtype="U8", kind="blocks"),
            S(p + "mlp.mlp2_weight.scales", (E, D, gf), [m + ("w2_scales",)], dtype="U8", kind="scales"),
            S(p + "mlp.mlp2_bias", (E, D), [m + ("b2",)], kind="bias"),
        ]
    return specs


def release_shards(cfg: GptOssConfig, layout: str, specs: list[TensorSpec],
                   num_shards: int | None = None) -> list[tuple[str, list[TensorSpec]]]:
    """Split the tensors into the released file names: HF `model-0000i-of-0000{n-1}.safetensors`
    (zero-based: 3 files for 20b, 15 for 120b); original `model.safetensors` (20b) or
    `model--0000i-of-0000n.safetensors` (120b). Tensors are cut by bytes, in release order."""
    if num_shards is None:
        big = cfg.num_local_experts > 32
        num_shards = (15 if big else 3) if layout == "hf" else (7 if big else 1)
    if num_shards == 1:
        return [("model.safetensors", specs)]
    sizes = [nbytes(s.shape, s.dtype) for s in specs]
    target = sum(sizes) / num_shards
    shards, cur, acc = [[] for _ in range(num_shards)], 0, 0
    for s, n in zip(specs, sizes):
        if acc >= target * (cur + 1) and cur < num_shards - 1 and shards[cur]:
            cur += 1
        shards[cur].append(s)
        acc += n
    shards = [s for s in shards if s]
    n = len(shards)
    if layout == "hf":
        names = [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    else:
        names = [f"model--{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards))


def detect_layout(path: str) -> str:
    """'orbax', 'hf' or 'original' for a local folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    if os.path.exists(os.path.join(path, ORBAX_MARKER)):
        return "orbax"
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face folder, an original/ "
                              "folder or a gptoss-jax converted folder)")
    d = read_json_object(cfg_path, error=ConfigError)
    return "original" if "num_experts" in d and "num_local_experts" not in d else "hf"


