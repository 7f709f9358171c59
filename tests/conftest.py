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
