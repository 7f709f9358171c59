"""Bad input never loses data, never loads silently wrong, never passes as success (issue 12).

Every case: the command refuses with one `gptoss-jax <cmd>: error: ...` line naming the bad input and a
non-zero status (or the API raises a ValueError / OSError naming it), and nothing the user had is
deleted or changed; no temporary folder outlives a run.
"""

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from gptoss_jax import CheckpointError, convert, generate, load_model, write_random_checkpoint
from gptoss_jax.checkpoint import SafetensorsFile, resolve
from gptoss_jax.checkpoint.atomic import scratch_name
from gptoss_jax.cli import main as cli
from gptoss_jax.config import load_config
from gptoss_jax.errors import ConfigError
from gptoss_jax.finetune import Dataset, FinetuneConfig, export_hf, finetune

from helpers import REFERENCE, REPO, tiny_config

FULL_VOCAB = tiny_config(vocab_size=201088, pad_token_id=199999, eos_token_id=200002, num_hidden_layers=2,
                         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
DATA = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                      {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."}]} for a in range(2)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "hf")
    write_random_checkpoint(tiny_config(num_hidden_layers=1), path, num_shards=2, progress=False)
    return path


@pytest.fixture(scope="module")
def full_vocab(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("full") / "hf")
    write_random_checkpoint(FULL_VOCAB, path, progress=False)
    return path


def tree_digest(path):
    """Every file under `path` (names, sizes, contents): to show that nothing changed."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for fn in sorted(files):
            p = os.path.join(root, fn)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def cli_error(capsys, *argv, fragments=()):
    """Run the CLI in-process: it must exit 2 with one error line (the last) naming `fragments`."""
    with pytest.raises(SystemExit) as e:
        cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, (e.value.code, err)
    assert err and err[-1].startswith(f"gptoss-jax {argv[0]}: error: "), err
    assert sum("error:" in line for line in err) == 1 and not any("Traceback" in line for line in err), err
    for frag in fragments:
        assert frag in err[-1], err[-1]
    return err[-1]


def no_temporaries(folder):
    left = [e for e in os.listdir(folder) if "gptoss-tmp" in e or "gptoss-old" in e or ".tmp-" in e
            or ".old-" in e]
    assert not left, left


# ---- data loss: convert -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_refuses_a_destination_overlapping_the_source(small, tmp_path, capsys, where):
    import shutil

    src = str(tmp_path / "models" / "src")
    shutil.copytree(small, src)
    before = tree_digest(str(tmp_path))
    dst = {"same": src, "parent": str(tmp_path / "models"), "inside": os.path.join(src, "orbax")}[where]
    cli_error(capsys, "convert", src, dst, "--overwrite", "--quiet", fragments=("is the source",))
    assert tree_digest(str(tmp_path)) == before
    no_temporaries(str(tmp_path / "models"))


def test_convert_over_a_file_leaves_no_old_copy(small, tmp_path):
    (tmp_path / "out").write_text("a file")
    cli(["convert", small, str(tmp_path / "out"), "--overwrite", "--quiet"])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert load_model(str(tmp_path / "out"), kernels="xla", progress=False).config == load_config(small)


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(small, tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.txt").write_text("years of work")
    cli_error(capsys, "convert", small, tmp_path / "stuff", "--overwrite", "--quiet",
              fragments=("neither empty nor a checkpoint",))
    assert (tmp_path / "stuff" / "thesis.txt").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["stuff"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_runs_are_removed(small, tmp_path):
    dead = _dead_pid()
    stale = tmp_path / scratch_name("out", pid=dead)
    (stale / "params").mkdir(parents=True)
    (stale / "params" / "junk").write_bytes(b"x" * 1000)
    live = tmp_path / scratch_name("out", pid=os.getppid())  # a live process's: kept
    live.mkdir()
    foreign = tmp_path / f".out.gptoss-tmp-not{socket.gethostname()}x-{dead}"  # another host's: kept
    foreign.mkdir()
    convert(small, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, foreign.name, "out"])


def test_a_destination_parked_by_an_interrupted_swap_comes_back(small, tmp_path):
    write_random_checkpoint(tiny_config(num_hidden_layers=1), str(tmp_path / "prev"), progress=False)
    digest = tree_digest(str(tmp_path / "prev"))
    os.rename(tmp_path / "prev", tmp_path / scratch_name("out", "gptoss-old", pid=_dead_pid()))
    with pytest.raises(FileExistsError):  # the old destination is back, and not overwritten
        convert(small, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"] and tree_digest(str(tmp_path / "out")) == digest


_MEDIUM = ("import sys; sys.path.insert(0, {tests!r}); from helpers import tiny_config; "
           "from gptoss_jax import write_random_checkpoint; "
           "write_random_checkpoint(tiny_config(num_hidden_layers=32, vocab_size=32000, hidden_size=256, "
           "intermediate_size=256, num_local_experts=16), sys.argv[1], progress=False)")


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~80 MB, 32 blocks: convert takes a few seconds, long enough to be interrupted."""
    path = str(tmp_path_factory.mktemp("medium") / "hf")
    subprocess.run([sys.executable, "-c", _MEDIUM.format(tests=os.path.join(REPO, "tests")), path], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, timeout=300)
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_convert_leaves_no_temporary_and_keeps_the_destination(medium, tmp_path, sig):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # an earlier "checkpoint" that --overwrite would replace
    p = subprocess.Popen([sys.executable, "-m", "gptoss_jax.cli", "convert", medium, str(dst), "--overwrite",
                          "--quiet"], env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = tmp_path / scratch_name("out", pid=p.pid)
    deadline = time.time() + 120
    while not (tmp / "params" / "block_002").exists():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, "convert did not start writing in 120 s"
        time.sleep(0.02)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0, err
    assert "Traceback" not in err, err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(dst) == ["config.json"] and (dst / "config.json").read_text() == "{}"


# ---- data loss: finetune --out -------------------------------------------------------------
def test_finetune_refuses_the_base_model_as_out(full_vocab, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(DATA[0]) + "\n")
    before = tree_digest(full_vocab)
    for out in (full_vocab, os.path.dirname(full_vocab), os.path.join(full_vocab, "ft")):
        cli_error(capsys, "finetune", "--model", full_vocab, "--data", data, "--steps", 1, "--out", out,
                  fragments=("is the base model",))
    assert tree_digest(full_vocab) == before


def test_finetune_refuses_an_out_holding_other_files(full_vocab, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "weights.safetensors").write_bytes(b"precious")
    (out / "config.json").write_text('{"mine": 1}')
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(DATA[0]) + "\n")
    for extra in ([], ["--resume"]):
        cli_error(capsys, "finetune", "--model", full_vocab, "--data", data, "--steps", 1, "--out", out, *extra,
                  fragments=(str(out),))
    assert sorted(os.listdir(out)) == ["config.json", "weights.safetensors"]
    assert (out / "weights.safetensors").read_bytes() == b"precious"


def test_export_replaces_only_the_files_of_the_runs_earlier_export(full_vocab, tmp_path):
    model = load_model(full_vocab, kernels="xla", progress=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.safetensors").write_bytes(b"not ours")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"an earlier export's shard")
    (out / "gptoss_finetune.json").write_text(json.dumps(
        {"format": "gptoss-jax-finetune-v1", "exported": ["model-00009-of-00009.safetensors"]}))
    export_hf(model, str(out))
    names = set(os.listdir(out))
    assert "notes.safetensors" in names and "model-00009-of-00009.safetensors" not in names
    assert (out / "notes.safetensors").read_bytes() == b"not ours"
    assert load_model(str(out), kernels="xla", progress=False).config == model.config
    no_temporaries(str(out))
    (out / "generation_config.json").unlink()
    (out / "gptoss_finetune.json").write_text(json.dumps({"format": "gptoss-jax-finetune-v1", "exported": []}))
    with pytest.raises(FileExistsError, match="did not write"):  # config.json is no longer the run's
        export_hf(model, str(out))


@pytest.fixture(scope="module")
def interrupted_run(full_vocab, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ft") / "run")
    fc = FinetuneConfig(steps=3, batch_size=1, seq_len=96, lr=1e-2, lora_rank=2, save_every=1)
    res = finetune(full_vocab, DATA, fc, out_dir=out, progress=False, stop_after=1, dtype="float32", kernels="xla")
    assert res.step == 1
    return out, fc


def test_resume_refuses_another_base_model(interrupted_run, tmp_path):
    out, fc = interrupted_run
    other = str(tmp_path / "other")
    write_random_checkpoint(FULL_VOCAB, other, seed=1, progress=False)  # same config, other weights
    before = tree_digest(out)
    with pytest.raises(ValueError, match="base model's weights are not those the run started from"):
        finetune(other, DATA, fc, out_dir=out, resume=True, progress=False, dtype="float32", kernels="xla")
    assert tree_digest(out) == before


def test_a_diverging_run_fails_and_exports_nothing(full_vocab, tmp_path):
    out = tmp_path / "nan"
    fc = FinetuneConfig(steps=4, batch_size=1, seq_len=96, lr=1e30, warmup_steps=0, clip_norm=1e30, lora_rank=2)
    with pytest.raises(RuntimeError, match="the loss is"):
        finetune(full_vocab, DATA, fc, out_dir=str(out), progress=False, dtype="float32", kernels="xla")
    assert not os.path.exists(out)  # made by the failed run and holding no checkpoint: removed


# ---- silently wrong: safetensors headers -----------------------------------------------------
def raw_safetensors(path, header, data: bytes):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header,nbytes,match", [
    ({"a": {**F32x2, "data_offsets": [-8, 0]}}, 8, "data_offsets"),  # reads the JSON header as weights
    ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, 8, "overlaps"),
    ({"a": {**F32x2, "data_offsets": [8, 16]}}, 16, "gap"),
    ({"a": {**F32x2, "data_offsets": [0, 8]}}, 16, "trailing"),
    ({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, 8, "data_offsets"),
    ([1, 2], 0, "JSON object"),
    ({"__metadata__": [1], "a": {**F32x2, "data_offsets": [0, 8]}}, 8, "__metadata__"),
])
def test_safetensors_headers_follow_the_library_rules(tmp_path, header, nbytes, match):
    from safetensors import safe_open

    path = raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * nbytes)
    with pytest.raises(Exception):  # the safetensors library rejects every one of them too
        with safe_open(path, "np") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=match):
        SafetensorsFile(path)


def test_header_that_is_a_list_is_one_error_line(small, tmp_path, capsys):
    import shutil

    shutil.copytree(small, tmp_path / "c")
    fn = "model-00000-of-00001.safetensors"
    raw_safetensors(tmp_path / "c" / fn, [1, 2], b"")
    cli_error(capsys, "convert", tmp_path / "c", tmp_path / "out", "--quiet", fragments=(fn, "JSON object"))
    assert sorted(os.listdir(tmp_path)) == ["c"]


_SHRINK = r"""
import sys, numpy as np
from gptoss_jax.checkpoint import SafetensorsFile, CheckpointError
path = sys.argv[1]
st = SafetensorsFile(path)
names = sorted(st.entries, key=lambda n: st.entries[n][2])
np.array(st.get(names[0]))  # the file is mapped now
with open(path, "r+b") as f:
    f.truncate(st.data_start + st.entries[names[0]][3])  # shrinks under the map
try:
    print(float(np.array(st.get(names[-1]), np.float32).sum()))
except CheckpointError as e:
    print("CheckpointError:", e)
"""


def test_a_shard_truncated_while_mapped_is_an_error_not_sigbus(small, tmp_path):
    import shutil

    shutil.copytree(small, tmp_path / "c")
    path = str(tmp_path / "c" / "model-00000-of-00001.safetensors")
    r = subprocess.run([sys.executable, "-c", _SHRINK, path], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7: killed by SIGBUS
    assert "CheckpointError" in r.stdout and "changed size" in r.stdout, r.stdout


# ---- silently wrong: paths ------------------------------------------------------------------
def test_converted_folder_loads_by_a_relative_path(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["convert", small, "out", "--quiet"])
    assert load_model("out", kernels="xla", progress=False).config == load_config(small)


def test_missing_relative_path_is_not_a_hub_download(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve("models/gpt")
    cli_error(capsys, "info", "models/gpt/config.json", fragments=("models/gpt/config.json", "no such file"))
    cli_error(capsys, "info", "./missing", fragments=("./missing", "no such file"))


# ---- silently wrong: config.json ------------------------------------------------------------
def _write_config(tmp_path, **changes):
    with open(os.path.join(REFERENCE, "gpt-oss-20b", "config.json")) as f:
        d = json.load(f)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))  # NaN is written as NaN, which json.load reads back
    return str(p)


@pytest.mark.parametrize("key,value", [
    ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-5), ("rope_theta", float("nan")), ("rope_theta", float("inf")),
    ("sliding_window", 0), ("sliding_window", -4), ("hidden_size", -2880), ("intermediate_size", 0),
    ("num_key_value_heads", 0), ("num_attention_heads", -64), ("num_hidden_layers", 2.5),
    ("num_local_experts", None), ("vocab_size", "201088"), ("head_dim", 64.0), ("max_position_embeddings", 0),
    ("swiglu_limit", float("nan")), ("attention_bias", "yes"), ("pad_token_id", -1), ("eos_token_id", [1.5]),
    ("num_experts_per_tok", True), ("rope_scaling", {"factor": 0.5}), ("rope_scaling", {"beta_fast": -1}),
    ("rope_scaling", {"original_max_position_embeddings": None}), ("rope_scaling", [1]),
    ("layer_types", "sliding_attention"),
])
def test_every_config_value_is_checked_naming_key_and_file(tmp_path, key, value):
    p = _write_config(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert p in str(e.value) and key in str(e.value), str(e.value)


def test_original_config_values_are_checked_by_their_own_keys(tmp_path):
    with open(os.path.join(REFERENCE, "gpt-oss-20b", "original", "config.json")) as f:
        d = json.load(f)
    for key, value in (("num_experts", 0), ("experts_per_token", 1.5), ("rope_scaling_factor", float("nan")),
                       ("initial_context_length", -1)):
        p = tmp_path / "config.json"
        p.write_text(json.dumps({**d, key: value}))
        with pytest.raises(ConfigError, match=key):
            load_config(str(p))


def test_config_that_is_a_list_or_not_json_names_the_file(small, tmp_path, capsys):
    import shutil

    for content, frag in (("[1, 2]", "JSON object"), ("{not json", "not valid JSON")):
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        shutil.copytree(small, tmp_path / "c")
        (tmp_path / "c" / "config.json").write_text(content)
        cfg = str(tmp_path / "c" / "config.json")
        cli_error(capsys, "info", tmp_path / "c", fragments=(cfg, frag))
        cli_error(capsys, "convert", tmp_path / "c", tmp_path / "out", "--quiet", fragments=(cfg, frag))
        with pytest.raises(ConfigError, match="config.json"):
            load_model(str(tmp_path / "c"), kernels="xla", progress=False)


def test_index_that_is_not_json_names_the_file(small, tmp_path):
    import shutil

    shutil.copytree(small, tmp_path / "c")
    index = tmp_path / "c" / "model.safetensors.index.json"
    for content, frag in (("{oops", "not valid JSON"), ('["a"]', "JSON object"),
                          ('{"weight_map": {"x": "../elsewhere.safetensors"}}', "weight_map")):
        index.write_text(content)
        with pytest.raises(CheckpointError, match=frag) as e:
            load_model(str(tmp_path / "c"), kernels="xla", progress=False)
        assert str(index) in str(e.value)


def test_generation_config_values_are_checked(small, tmp_path):
    import shutil

    shutil.copytree(small, tmp_path / "c")
    for bad in ({"temperature": -1}, {"top_p": 2.0}, {"eos_token_id": "x"}, {"top_k": 2.5}):
        (tmp_path / "c" / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="generation_config.json.*" + next(iter(bad))):
            load_model(str(tmp_path / "c"), kernels="xla", progress=False)


# ---- silently wrong: generate inputs ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(small):
    return load_model(small, dtype="float32", kernels="xla", progress=False)


@pytest.mark.parametrize("ids,lengths,match", [
    ([[1, 64.9]], None, "integer token ids"),
    ([[True, False]], None, "integer token ids"),
    (np.array([[1.0, 2.0]]), None, "integer token ids"),
    (np.array([[True, True]]), None, "integer token ids"),
    (np.array([[1, 2, 3], [4, 5, 6]]), [2, -1], "prompt_lengths"),
    (np.array([[1, 2, 3], [4, 5, 6]]), [2, 4], "prompt_lengths"),
    (np.array([[1, 2, 3], [4, 5, 6]]), [3], "prompt_lengths"),  # a whole prompt would be dropped
    (np.array([[1, 2, 3], [4, 5, 6]]), [3, 2.5], "prompt_lengths"),
    ([[1, 2], [3]], [1, 1], "prompt_lengths"),
    ([[[1, 2]], [3]], None, "flat list"),
])
def test_generate_refuses_non_integer_ids_and_bad_prompt_lengths(tiny_model, ids, lengths, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, ids, max_new_tokens=2, prompt_lengths=lengths)


# ---- silently wrong: finetune ----------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("nan")), "lr"), (dict(lr=0.0), "lr"), (dict(lr=float("inf")), "lr"),
    (dict(save_every=0), "save_every"), (dict(keep=0), "keep"), (dict(steps=0), "steps"),
    (dict(seq_len=1), "seq_len"), (dict(weight_decay=-1.0), "weight_decay"), (dict(clip_norm=0.0), "clip_norm"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(lora_rank=-1), "lora_rank"),
    (dict(lora_alpha=float("nan")), "lora_alpha"), (dict(lora_targets=("q", "x")), "targets"),
    (dict(seed=2**64), "seed"), (dict(reasoning_effort="max"), "reasoning_effort"),
    (dict(end_lr_fraction=2.0), "end_lr_fraction"), (dict(batch_size=1.5), "batch_size"),
])
def test_finetune_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kw)


def test_finetune_cli_checks_settings_before_loading(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(DATA[0]) + "\n")
    base = ["finetune", "--model", "/no/such/model", "--data", data, "--steps", 2, "--out", tmp_path / "o"]
    cli_error(capsys, *base, "--lr", "nan", fragments=("lr", "NaN"))
    cli_error(capsys, *base, "--save-every", "0", fragments=("save_every",))
    cli_error(capsys, *base, "--seed", str(2**64), fragments=("seed",))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_finetune_on_a_vocabulary_without_harmony_tokens_is_refused(small, tmp_path):
    with pytest.raises(ValueError, match="vocabulary has 1000 tokens"):
        finetune(small, DATA, FinetuneConfig(steps=1, seq_len=96), out_dir=str(tmp_path / "o"), progress=False,
                 kernels="xla")
    assert os.listdir(tmp_path) == []


def test_a_conversation_without_an_assistant_turn_is_refused():
    with pytest.raises(ValueError, match="example 1: no assistant tokens"):
        Dataset.from_examples([DATA[0], {"messages": [{"role": "user", "content": "hi"}]}], 96)


@pytest.mark.parametrize("line,match", [
    ('[{"role": "user", "content": "hi"}]', "JSON object"),
    ('{"messages": [{"role": "user", "content": null}]}', "content"),
    ('{"messages": [{"role": "user"}]}', "content"),
    ('{"messages": "hi"}', "message must be"),
])
def test_jsonl_errors_name_the_line(tmp_path, capsys, line, match):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(DATA[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=match) as e:
        Dataset.from_jsonl(str(data), 96)
    assert f"{data}:3:" in str(e.value)


def test_finetune_cli_jsonl_error_is_one_line_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": null}]}\n')
    cli_error(capsys, "finetune", "--model", tmp_path / "not-loaded", "--data", data, "--steps", 1,
              "--out", tmp_path / "o", "--kernels", "xla", fragments=(f"{data}:1:",))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


# ---- silently wrong: aot ------------------------------------------------------------------
@pytest.mark.parametrize("args,frag", [
    (["--batch", "0"], "batch"), (["--batch", "-2"], "batch"), (["--prefill-chunk", "0"], "prefill_chunk"),
    (["--max-len", "-8"], "max_len"), (["--max-len", "0"], "max_len"), (["--devices", "0"], "devices"),
])
def test_aot_refuses_non_positive_sizes(capsys, args, frag):
    cli_error(capsys, "aot", "--target", "tpu-v5e", *args, fragments=(frag,))


# ---- errors reported as success ------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["generate", "chat"])
@pytest.mark.parametrize("args,frag", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top_p"), (["--max-tokens", "0"], "max-tokens"),
    (["--top-k", "0"], "top_k"), (["--seed", str(2**64)], "seed"),
])
def test_sampling_arguments_are_checked_before_the_model_loads(capsys, cmd, args, frag):
    prompt = ["--prompt", "hi"] if cmd == "generate" else []
    cli_error(capsys, cmd, "--model", "/no/such/model", *prompt, *args, fragments=(frag,))


def test_chat_mode_generation_errors_are_errors_not_empty_replies(small, full_vocab, capsys, monkeypatch):
    # ids out of range: harmony's special tokens in a 1000-token vocabulary
    cli_error(capsys, "generate", "--model", small, "--prompt", "hi", "--kernels", "xla",
              fragments=("out of range",))
    # a reply longer than the model's context (256 tokens)
    cli_error(capsys, "generate", "--model", full_vocab, "--prompt", "hi", "--max-tokens", 400, "--kernels", "xla",
              fragments=("exceeds the model's context",))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))
    cli_error(capsys, "chat", "--model", small, "--kernels", "xla", fragments=("out of range",))


def test_make_random_checkpoint_errors_are_one_line(tmp_path, capsys):
    cli_error(capsys, "make-random-checkpoint", tmp_path / "x", fragments=("--preset or --config",))
    cli_error(capsys, "make-random-checkpoint", tmp_path / "x", "--preset", "gpt-oss-20b", "--num-shards", "0",
              fragments=("--num-shards",))
    assert os.listdir(tmp_path) == []
