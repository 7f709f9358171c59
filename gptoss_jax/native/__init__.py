"""Native XLA:CPU kernels (C++ through XLA's FFI), built on first use with the host's C++ compiler.

`mxfp4.cc`, for MXFP4 experts in checkpoint layout:
- rows: y[r] = W_{e[r]} x[r], each routed row reading its expert's packed bytes once (the MoE decode
  step; `cpu_kernels.experts_rows`). XLA's own fusion of the same product (`cpu_kernels.mxfp4_matvec`)
  spends ~45 instructions on 32 weights; the kernel looks the codes up in a register-held table and
  needs ~14 (2.7x, measured on AVX-512);
- dequant: one expert's W [N, K] in bfloat16 (the prefill tiles; `cpu_kernels.expert_tile`), ~6x XLA's.
(The dense bfloat16 projections gain nothing from a native kernel: XLA's formulations of `cpu_kernels`
already read them at about one core's memory bandwidth.)

The build: `c++ -O3 -march=native -std=c++17 -shared -fPIC` against jaxlib's FFI headers, into
$GPTOSS_JAX_CACHE (default ~/.cache/gptoss-jax) under a key of the source, the compiler's version,
jaxlib's version and the host CPU's flags (so a shared home never loads another CPU's build); written to
a temporary file, then renamed. No compiler, a failed build, a host other than Linux x86-64 or
GPTOSS_JAX_NATIVE=0: `available()` is False (one log line says why) and the XLA formulation serves.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("mxfp4.cc"),)
TARGETS = {"gptoss_jax_mxfp4_rows": "GptossMxfp4Rows",  # FFI target name: the library's symbol
           "gptoss_jax_mxfp4_dequant": "GptossMxfp4Dequant"}
MXFP4_ROWS, MXFP4_DEQUANT = TARGETS
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
CACHE_ENV, SWITCH_ENV = "GPTOSS_JAX_CACHE", "GPTOSS_JAX_NATIVE"
BUILD_TIMEOUT_S = 300


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptoss-jax")


def compiler() -> str | None:
    """$CXX, else the first C++ compiler on PATH."""
    return os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(cxx: str) -> Path:
    """The shared library for this host (built now unless cached). Raises on a failed build."""
    import jax
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES), version, jaxlib.__version__,
                                    " ".join(CXX_FLAGS), _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the native kernels are registered with XLA:CPU in this process (built, or loaded
    from the cache, on the first call)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        log.info("native CPU kernels: only built on Linux x86-64; using the XLA formulations")
        return False
    return load(compiler())


def load(cxx: str | None) -> bool:
    """Build (or find in the cache) and register the kernels with compiler `cxx`; False, with one
    warning saying why, when that fails."""
    if cxx is None:
        log.warning("native CPU kernels: no C++ compiler (set CXX); using the XLA formulations (slower decode)")
        return False
    try:
        import jax

        lib = ctypes.cdll.LoadLibrary(str(build(cxx)))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # any failure leaves the XLA formulations in place
        log.warning("native CPU kernels unavailable (%s: %s); using the XLA formulations", type(e).__name__,
                    str(e)[:500])
        return False
    return True


def mxfp4_rows_call(x_RK, blocks_ENGb, scales_ENG, experts_R):
    """The FFI call (no differentiation rule: `cpu_kernels.mxfp4_rows` adds it): float32 [R, N]."""
    import jax
    import jax.numpy as jnp

    R, N = x_RK.shape[0], blocks_ENGb.shape[1]
    call = jax.ffi.ffi_call(MXFP4_ROWS, jax.ShapeDtypeStruct((R, N), jnp.float32), vmap_method="sequential")
    return call(x_RK.astype(jnp.float32), blocks_ENGb, scales_ENG, experts_R.astype(jnp.int32))



def mxfp4_dequant_call(blocks_NGb, scales_NG):
    """One MXFP4 matrix (blocks [N, K/32, 16], scales [N, K/32]) dequantized: bfloat16 [N, K]."""
    import jax
    import jax.numpy as jnp

    N, G = scales_NG.shape
    call = jax.ffi.ffi_call(MXFP4_DEQUANT, jax.ShapeDtypeStruct((N, G * 32), jnp.bfloat16), vmap_method="sequential")
    return call(blocks_NGb, scales_NG)
