"""Fine-tuning: loss mask, LoRA identity at init, loss falls, exact resume, HF export vs transformers, CLI.

All on a tiny gpt-oss with the full 201,088-token vocabulary (hidden 64, 2 layers), float32 compute.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax import load_model, write_random_checkpoint
from gptoss_jax import tokenizer as tok
from gptoss_jax.checkpoint import SafetensorsFile
from gptoss_jax.finetune import Dataset, FinetuneConfig, assistant_mask, finetune, merged_copy, render_example
from gptoss_jax.harmony import load_harmony_encoding, render_prompt
from gptoss_jax.lora import LoRAParam, apply_lora, has_lora, lora_info, merge_lora

from helpers import REPO, hf_logits, hf_reference, random_ids, rel_err, tiny_config

CFG = tiny_config(vocab_size=201088, pad_token_id=199999, eos_token_id=200002, num_hidden_layers=2,
                  num_local_experts=4, num_experts_per_tok=2)
DATA = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                      {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}]} for a in range(4)]
SEQ, BATCH = 96, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ft") / "base")
    write_random_checkpoint(CFG, path, seed=0, progress=False)
    return path


def _load(path):
    return load_model(path, dtype="float32", kernels="xla", progress=False)


def _runs(mask):
    """Contiguous True runs of a bool array as (start, stop) pairs."""
    m = np.concatenate([[False], mask, [False]]).astype(int)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


# ---- loss mask ----------------------------------------------------------------------------
def test_mask_single_turn_is_the_completion_after_the_prompt():
    """Independent reference: render_prompt([user]) is the prompt ending in <|start|>assistant;
    the trained tokens are exactly everything after it."""
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ids, mask = render_example({"messages": msgs})
    prompt = render_prompt(msgs[:1])
    assert list(ids[:len(prompt)]) == prompt and prompt[-2:] == [tok.START, 173781]
    np.testing.assert_array_equal(mask, np.arange(len(ids)) >= len(prompt))
    enc = load_harmony_encoding()
    assert enc.decode(ids[mask].tolist()) == "<|channel|>final<|message|>Hello!<|return|>"


def test_mask_multi_turn_with_tool_call_covers_exactly_assistant_messages():
    enc = load_harmony_encoding()
    tools = [{"name": "add", "description": "add numbers", "parameters": {"type": "object", "properties": {}}}]
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "old thoughts", "channel": "analysis"},  # earlier turn: dropped
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "T2", "channel": "analysis"},
            {"role": "assistant", "content": '{"a":1}', "recipient": "functions.add",
             "content_type": "<|constrain|>json"},
            {"role": "tool", "name": "functions.add", "content": "TOOLRESULT"},
            {"role": "assistant", "content": "A2"}]
    ids, mask = render_example({"messages": msgs, "tools": tools})
    runs = [enc.decode(ids[a:b].tolist()) for a, b in _runs(mask)]
    assert runs == ["<|channel|>final<|message|>A1<|end|>",
                    "<|channel|>analysis<|message|>T2<|end|>",
                    ' to=functions.add<|channel|>commentary <|constrain|>json<|message|>{"a":1}<|call|>',
                    "<|channel|>final<|message|>A2<|return|>"]
    # every run is preceded by <|start|>assistant; nothing else is masked
    for a, _ in _runs(mask):
        assert ids[a - 2] == tok.START and enc.decode([int(ids[a - 1])]) == "assistant"
    unmasked = enc.decode(ids[~mask].tolist())
    for text in ("Be brief.", "U1", "U2", "TOOLRESULT"):
        assert text in unmasked
    assert "old thoughts" not in enc.decode(ids.tolist())
    assert assistant_mask(ids.tolist()).tolist() == mask.tolist()


def test_dataset_pads_truncates_and_masks_padding():
    ds = Dataset.from_examples(DATA, SEQ)
    assert ds.ids.shape == (4, SEQ) and ds.ids.dtype == np.int32
    n = len(render_example(DATA[0])[0])
    assert n < SEQ and (ds.ids[0, n:] == 199999).all() and not ds.mask[0, n:].any()
    short = Dataset.from_examples(DATA, n - 3)
    assert short.truncated == 4 and short.ids.shape == (4, n - 3)
    with pytest.raises(ValueError, match="no assistant tokens"):
        Dataset.from_examples(DATA, 20)


# ---- LoRA ---------------------------------------------------------------------------------
def test_lora_zero_b_equals_base_exactly(base):
    model = _load(base)
    ids = random_ids(CFG, 2, 24, seed=3)
    ref = np.asarray(model(ids))
    apply_lora(model, rank=4, targets=("q", "k", "v", "o", "router"))
    info = lora_info(model)
    assert info["targets"] == ["q", "k", "v", "o", "router"] and info["rank"] == 4
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    assert n == info["parameters"] > 0
    np.testing.assert_array_equal(np.asarray(model(ids)), ref)


def test_lora_zero_b_bfloat16_within_bf16_noise(base):
    """bf16 compute: the extra (zero) terms change XLA's fusion and thus bf16 rounding (and, through
    it, near-tied routing), so equality is only up to the bf16 noise of the base model itself."""
    ids = random_ids(CFG, 2, 24, seed=3)
    f32 = np.asarray(_load(base)(ids))
    model = load_model(base, dtype="bfloat16", kernels="xla", progress=False)
    ref = np.asarray(model(ids))
    apply_lora(model, rank=4, targets=("q", "k", "v", "o", "router"))
    noise = np.linalg.norm(ref - f32) / np.linalg.norm(f32)
    diff = np.linalg.norm(np.asarray(model(ids)) - ref) / np.linalg.norm(f32)
    print(f"bf16: base vs f32 {noise:.4f}, adapted (B=0) vs base {diff:.4f}")
    assert diff <= 2 * noise


def test_merge_lora_matches_adapted_model(base):
    model = _load(base)
    # float32 base weights, so that the merged weights are not rounded to bf16
    nnx.update(model, jax.tree.map(lambda x: x.astype(np.float32), nnx.state(model, nnx.Param)))
    ids = random_ids(CFG, 1, 24, seed=4)
    ref = np.asarray(model(ids))
    apply_lora(model, rank=4, targets="q,k,v,o,router", init_b_zero=False)
    adapted = np.asarray(model(ids))
    assert rel_err(adapted, ref) > 1e-3  # the adapters do something
    copy = merged_copy(model)  # shares the arrays, leaves `model` as it was
    assert has_lora(model) and not has_lora(copy)
    np.testing.assert_array_equal(np.asarray(model(ids)), adapted)
    assert rel_err(np.asarray(copy(ids)), adapted) < 1e-4
    merge_lora(model)
    assert not has_lora(model)
    assert rel_err(np.asarray(model(ids)), adapted) < 1e-4


def test_lora_gradients_through_pallas_kernels_equal_xla(base):
    """kernels="pallas" (interpret): the custom_vjp backward passes of the MXFP4 grouped matmul and
    the banded attention (sinks included) give the XLA path's LoRA gradients, frozen experts."""
    from gptoss_jax.finetune import loss_fn

    ids = jnp.asarray(random_ids(CFG, 2, 40, seed=6))  # longer than the window of 16
    mask = jnp.ones(ids.shape, bool)
    grads = {}
    for kernels in ("xla", "pallas"):
        model = load_model(base, dtype="float32", kernels=kernels, progress=False)
        apply_lora(model, rank=4, targets="q,k,v,o,router", init_b_zero=False)
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model, ids, mask)
        grads[kernels] = (float(loss), {"/".join(map(str, k)): np.asarray(v.get_value())
                                        for k, v in nnx.to_flat_state(g)})
    (lx, gx), (lp, gp) = grads["xla"], grads["pallas"]
    assert abs(lp - lx) <= 1e-5 * abs(lx)
    assert gx.keys() == gp.keys() and len(gx) == 2 * 5 * CFG.num_hidden_layers
    for k in gx:
        assert np.abs(gx[k]).max() > 0, k
        assert rel_err(gp[k], gx[k]) <= 1e-4, (k, rel_err(gp[k], gx[k]))


# ---- training -----------------------------------------------------------------------------
def _packed(path):
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            st = SafetensorsFile(os.path.join(path, fn))
            out.update({k: np.array(st.get(k)) for k in st.entries if "_blocks" in k or "_scales" in k})
            st.close()
    return out


def test_lora_loss_falls_resume_is_exact_and_export_matches_transformers(base, tmp_path):
    fc = FinetuneConfig(steps=8, batch_size=BATCH, seq_len=SEQ, lr=1e-2, lora_rank=8, save_every=2, keep=2)
    full = finetune(_load(base), DATA, fc, out_dir=str(tmp_path / "a"), progress=False)
    losses = np.array(full.losses)
    print("LoRA losses", losses.round(4).tolist())
    assert len(losses) == 8 and losses[-2:].mean() < losses[:2].mean() - 0.15
    assert sorted(os.listdir(tmp_path / "a" / "train_state"), key=int) == ["6", "8"]

    # interrupted at step 3, then resumed in a fresh process-like setting (new model from the base)
    part = finetune(_load(base), DATA, fc, out_dir=str(tmp_path / "b"), progress=False, stop_after=3)
    assert part.step == 3 and not os.path.exists(tmp_path / "b" / "config.json")  # not exported yet
    with pytest.raises(FileExistsError):
        finetune(_load(base), DATA, fc, out_dir=str(tmp_path / "b"), progress=False)
    resumed = finetune(_load(base), DATA, fc, out_dir=str(tmp_path / "b"), progress=False, resume=True)
    assert len(resumed.new_losses) == 5
    np.testing.assert_array_equal(np.array(resumed.losses), losses)

    # the HF export: loads in load_model and transformers, same logits; experts untouched
    out = str(tmp_path / "a")
    ids = random_ids(CFG, 2, 40, seed=5)
    ours = np.asarray(_load(out)(ids))
    err = rel_err(ours, hf_logits(hf_reference(out), ids))
    print(f"export vs transformers rel err {err:.2e}")
    assert err <= 1e-4
    before, after = _packed(base), _packed(out)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # the merged export equals the trained adapted model up to bf16 rounding of the merged weights
    adapted = np.asarray(full.model(ids))
    assert rel_err(ours, adapted) < 5e-2
    assert rel_err(ours, np.asarray(_load(base)(ids))) > 10 * rel_err(ours, adapted)


def test_full_finetune_with_grad_accumulation_keeps_experts_frozen(base, tmp_path):
    model = _load(base)
    mlp = model.blocks[0].mlp
    packed = {name: np.array(getattr(mlp, name)[...]) for name in ("w1_blocks", "w1_scales", "w2_blocks")}
    fc = FinetuneConfig(steps=4, batch_size=1, grad_accum=2, seq_len=SEQ, lr=3e-2, lora_rank=0, save_every=100)
    res = finetune(model, DATA, fc, out_dir=str(tmp_path / "full"), progress=False)
    print("full fine-tuning losses", np.round(res.losses, 4).tolist())
    assert res.losses[-1] < res.losses[0] - 0.5
    assert not has_lora(res.model)
    assert res.step == 4 and str(model.embed_VD[...].dtype) == "float32"  # float32 master weights
    for name, arr in packed.items():
        np.testing.assert_array_equal(np.asarray(getattr(mlp, name)[...]), arr)
    reloaded = _load(str(tmp_path / "full"))
    ids = random_ids(CFG, 1, 16, seed=6)
    # the export holds the float32 master weights rounded to the checkpoint's bf16
    rounded = merged_copy(res.model)
    nnx.update(rounded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(rounded, nnx.Param)))
    assert rel_err(np.asarray(reloaded(ids)), np.asarray(rounded(ids))) <= 1e-4


def test_cli_finetune_json_and_resume(base, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DATA) + "\n")
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "gptoss_jax.cli", "finetune", "--model", base, "--data", str(data),
           "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--lr", "1e-2", "--lora-rank", "4",
           "--dtype", "float32", "--kernels", "xla", "--out", out, "--json", "--save-every", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd + ["--steps", "2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["steps"] == 2 and np.isfinite(first["first_loss"]) and np.isfinite(first["last_loss"])
    assert "fine-tuning" in r.stderr  # the tqdm bar
    # the resumed run data parallel over 2 (forced CPU) devices, as `gptoss-jax aot --program finetune --mesh` plans
    env2 = {**env, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    r = subprocess.run(cmd + ["--steps", "3", "--resume", "--mesh", "data=2"], capture_output=True, text=True,
                       env=env2, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    second = json.loads(r.stdout.strip().splitlines()[-1])
    assert second["steps"] == 3 and second["steps_this_run"] == 1 and second["first_loss"] == first["first_loss"]
    assert first["mesh"] is None and second["mesh"] == {"data": 2, "expert": 1, "model": 1}
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [e["step"] for e in log] == [1, 2, 3]
    model = _load(out)
    assert model.config.vocab_size == 201088 and not has_lora(model)


_MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from gptoss_jax import load_model
from gptoss_jax.finetune import FinetuneConfig, finetune
base, data = sys.argv[1], json.loads(sys.argv[2])
from gptoss_jax.sharding import make_mesh
assert jax.device_count() == 4
fc = FinetuneConfig(steps=2, batch_size=2, seq_len=int(sys.argv[3]), lr=1e-2, lora_rank=4)
out = {}
explicit = jax.make_mesh((2, 2, 1), ("data", "expert", "model"))  # Explicit axes (jax.make_mesh's default)
for name, mesh in (("single", None), ("sharded", make_mesh(data=2, expert=2)), ("explicit", explicit)):
    # sharded: experts split over 2 devices by load_model, batch rows over the 2 of "data"
    model = load_model(base, dtype="float32", kernels="xla", progress=False, mesh=mesh)
    res = finetune(model, data, fc, mesh=mesh, progress=False)
    leaf = res.model.blocks[0].attn.lora_q_b[...]
    experts = res.model.blocks[0].mlp.w1_blocks[...]
    out[name] = {"losses": res.losses, "devices": len(leaf.sharding.device_set),
                 "expert_shard": list(experts.addressable_shards[0].data.shape)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_on_a_mesh_matches_single_device(base):
    """4 forced CPU devices, a model loaded on a (data=2, expert=2) mesh: batch rows split over "data",
    experts over "expert" (expert parallel), adapters replicated: same losses as on one device; the
    same on a mesh from jax.make_mesh (Explicit axes)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, base, json.dumps(DATA), str(SEQ)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out["single"]["devices"] == 1 and out["sharded"]["devices"] == 4
    assert out["sharded"]["expert_shard"][0] == CFG.num_local_experts // 2
    np.testing.assert_allclose(out["sharded"]["losses"], out["single"]["losses"], rtol=1e-5)
    assert out["explicit"]["devices"] == 4 and out["explicit"]["expert_shard"] == out["sharded"]["expert_shard"]
    np.testing.assert_allclose(out["explicit"]["losses"], out["single"]["losses"], rtol=1e-5)
