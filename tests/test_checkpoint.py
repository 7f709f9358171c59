"""Checkpoint IO: the released layouts exactly, strict validation, atomic writes, Hub patterns."""

import fnmatch
import json
import os
import shutil

import numpy as np
import pytest

from gptoss_jax import CheckpointError, convert, load_model, write_random_checkpoint
from gptoss_jax.checkpoint import HF_INDEX, SafetensorsFile, resolve, write_safetensors
from gptoss_jax.cli import main as cli

from helpers import REFERENCE, tiny_config


def read_layout(folder):
    tensors, files = {}, sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    for fn in files:
        st = SafetensorsFile(os.path.join(folder, fn))
        for name, (dtype, shape, _, _) in st.entries.items():
            tensors[name] = {"shape": list(shape), "dtype": dtype}
    return files, tensors


@pytest.mark.parametrize("name,layout,files", [
    ("gpt-oss-20b", "hf", [f"model-0000{i}-of-00002.safetensors" for i in range(3)]),
    ("gpt-oss-20b", "original", ["model.safetensors"]),
    ("gpt-oss-120b", "hf", [f"model-{i:05d}-of-00014.safetensors" for i in range(15)]),
    ("gpt-oss-120b", "original", [f"model--{i:05d}-of-00007.safetensors" for i in range(1, 8)]),
])
def test_random_release_layout_equals_reference(name, layout, files, tmp_path):
    dst = str(tmp_path / name)
    cli(["make-random-checkpoint", "--preset", name, "--layout", layout, "--zeros", "--quiet", dst])
    got_files, tensors = read_layout(dst)
    ref_dir = os.path.join(REFERENCE, name) if layout == "hf" else os.path.join(REFERENCE, name, "original")
    with open(os.path.join(ref_dir, "tensors.json")) as f:
        ref = json.load(f)
    assert got_files == files
    assert tensors == ref["tensors"]
    assert sum(os.path.getsize(os.path.join(dst, f)) - SafetensorsFile(os.path.join(dst, f)).data_start
               for f in files) == ref["total_bytes"]
    with open(os.path.join(dst, "config.json")) as f, open(os.path.join(ref_dir, "config.json")) as g:
        ours, theirs = json.load(f), json.load(g)
    assert {k: ours.get(k) for k in theirs if k != "transformers_version"} == \
        {k: v for k, v in theirs.items() if k != "transformers_version"}
    if layout == "hf":
        with open(os.path.join(dst, "generation_config.json")) as f, \
                open(os.path.join(ref_dir, "generation_config.json")) as g:
            assert json.load(f) == json.load(g)
        with open(os.path.join(dst, HF_INDEX)) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == set(ref["tensors"]) and set(index["weight_map"].values()) == set(files)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "hf")
    write_random_checkpoint(tiny_config(), path, num_shards=2, progress=False)
    return path


def broken_copy(src, dst, edit):
    """Copy the checkpoint and rewrite the shard holding layer 1's q_proj with edit(entries)."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, HF_INDEX)) as f:
        fn = json.load(f)["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    st = SafetensorsFile(os.path.join(dst, fn))
    entries = {n: np.array(st.get(n)) for n in st.entries}
    st.close()
    entries = edit(entries)
    from gptoss_jax.checkpoint import ST_NAMES
    write_safetensors(os.path.join(dst, fn), [(n, a.shape, ST_NAMES[a.dtype], (lambda a=a: a))
                                               for n, a in entries.items()])
    return fn


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype="float32", kernels="xla", progress=False)
    for frag in fragments:
        assert frag in str(e.value), str(e.value)


Q = "model.layers.1.self_attn.q_proj.weight"


def test_missing_tensor(small, tmp_path):
    fn = broken_copy(small, tmp_path / "c", lambda e: {k: v for k, v in e.items() if k != Q})
    expect_error(str(tmp_path / "c"), "missing tensor", Q)
    assert fn


def test_wrong_shape(small, tmp_path):
    fn = broken_copy(small, tmp_path / "c", lambda e: {**e, Q: e[Q][:-1]})
    expect_error(str(tmp_path / "c"), Q, fn, "shape")


def test_wrong_dtype(small, tmp_path):
    fn = broken_copy(small, tmp_path / "c", lambda e: {**e, Q: e[Q].astype(np.float32)})
    expect_error(str(tmp_path / "c"), Q, fn, "dtype F32")


def test_unexpected_tensor(small, tmp_path):
    fn = broken_copy(small, tmp_path / "c", lambda e: {**e, "model.layers.9.extra": np.zeros(3, np.float32)})
    expect_error(str(tmp_path / "c"), "unexpected tensor", "model.layers.9.extra", fn)


def test_truncated_file(small, tmp_path):
    shutil.copytree(small, tmp_path / "c")
    fn = sorted(f for f in os.listdir(tmp_path / "c") if f.endswith(".safetensors"))[-1]
    p = tmp_path / "c" / fn
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    last = max(SafetensorsFile(os.path.join(small, fn)).entries.items(), key=lambda kv: kv[1][3])[0]
    expect_error(str(tmp_path / "c"), "truncated", fn, last)
    with open(p, "r+b") as f:
        f.truncate(5)
    expect_error(str(tmp_path / "c"), "truncated", fn)


def test_missing_shard(small, tmp_path):
    shutil.copytree(small, tmp_path / "c")
    os.remove(tmp_path / "c" / "model-00001-of-00001.safetensors")
    expect_error(str(tmp_path / "c"), "model-00001-of-00001.safetensors", "missing")


def test_failed_conversion_leaves_nothing(small, tmp_path):
    shutil.copytree(small, tmp_path / "c")
    with open(tmp_path / "c" / "model-00000-of-00001.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError):
        convert(str(tmp_path / "c"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_convert_refuses_to_overwrite(small, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert(small, str(tmp_path / "out"), progress=False)


def test_hub_download_selects_only_the_needed_files(monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        seen["repo"], seen["patterns"] = repo_id, allow_patterns
        return "/nonexistent"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve("openai/gpt-oss-20b") == "/nonexistent"
    repo_files = ["config.json", "generation_config.json", HF_INDEX, "tokenizer.json", "chat_template.jinja",
                  *[f"model-0000{i}-of-00002.safetensors" for i in range(3)], "original/config.json",
                  "original/model.safetensors", "original/dtypes.json", "metal/model.bin", "README.md"]
    kept = sorted(f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in seen["patterns"]))
    assert kept == sorted(["config.json", "generation_config.json", HF_INDEX,
                           *[f"model-0000{i}-of-00002.safetensors" for i in range(3)]])


def test_offline_hub_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not download 'openai/gpt-oss-20b'.*local folder"):
        resolve("openai/gpt-oss-20b")


def test_not_a_path_nor_repo_id():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve("/definitely/not/here")
