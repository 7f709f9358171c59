"""Shared test setup: CPU JAX, offline vocab, tiny configs and reference models."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
if os.path.isdir(os.path.join(SHARED, "vocab")):
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", os.path.join(SHARED, "vocab"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # f32 parity tests compare true f32 math


# scripts/test hands whole files to two workers in collection order (--dist loadfile
# --no-loadscope-reorder): the longest files go first, so both workers finish together.
LONGEST_FIRST = ("test_aot.py", "test_banded_attention.py", "test_sharding.py", "test_engine.py", "test_finetune.py",
                 "test_mxfp4_gmm.py", "test_paged.py", "test_generate.py", "test_server.py", "test_notebooks.py",
                 "test_structured.py", "test_targets.py", "test_paged_attention.py", "test_parity.py",
                 "test_cpu_kernels.py", "test_moe.py", "test_sampling.py", "test_tool_loop.py", "test_validation.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
