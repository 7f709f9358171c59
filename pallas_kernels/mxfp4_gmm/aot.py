"""Deviceless (AOT) compiles of the kernels at gpt-oss shapes, with static figures.

Run one case per process (XLA_FLAGS must be set before JAX initialises a backend):

    python -m pallas_kernels.mxfp4_gmm.aot --target h100 --experts 32 --m 16384 --proj gate_up

prints one JSON line: compile time, XLA memory analysis, and for H100 the Triton kernel's PTX
statistics from `ptxas -arch=sm_90a -v` (registers, spill bytes, MMA instructions; the other GPUs
with their own arch), for TPU the kernel's static VMEM footprint (block sizes x double buffering +
scratch) vs the scoped limit and the `pl.CostEstimate` found in the Mosaic custom call.
Targets: the GPUs of `pallas_kernels.gpu_targets` (h100, a100-80g, a100-40g, l4, t4), v5e, v6e,
tpu7x. Needs the `aot` extra (libtpu, jax-cuda12-plugin, nvcc).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import gpu_targets

TPU_TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "tpu7x": "tpu7x:2x2x1"}
# Physical VMEM per TensorCore (bytes): v5e/v6e 128 MiB, v7x (tpu7x) 64 MiB.
TPU_VMEM_BYTES = {"v5e": 128 << 20, "v6e": 128 << 20, "tpu7x": 64 << 20}
HIDDEN = 2880
INTERMEDIATE = 2880


def repo_root() -> Path:
  return Path(__file__).resolve().parents[2]


def toolchain_available(target: str) -> bool:
  import importlib.util
  if target in gpu_targets.TARGETS:
    return gpu_targets.cuda_toolchain_available()
  return importlib.util.find_spec("libtpu") is not None


def case_shapes(experts: int, m: int, proj: str):
  """(x shape, wq shape, ws shape, bias shape, k, n, splits) at gpt-oss sizes."""
  from . import layout
  k = HIDDEN if proj == "gate_up" else INTERMEDIATE
  n = INTERMEDIATE if proj == "gate_up" else HIDDEN
  s = 2 if proj == "gate_up" else 1
  kp = -(-k // layout.CHUNK_K) * layout.CHUNK_K
  return (m, k), (experts, s, kp // 8, n), (experts, s, kp // layout.CHUNK_K, n), (experts, s, n), k, n, s


def run_case(target: str, experts: int, m: int, proj: str, dtype: str = "bfloat16",
             normal_scales: bool = True) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding

  from . import common, layout

  gpu = target in gpu_targets.TARGETS
  if gpu:
    device = gpu_targets.topology_devices(target, 1)[0]
  else:
    device = topologies.get_topology_desc(TPU_TOPOLOGIES[target], platform="tpu").devices[0]
  sh = SingleDeviceSharding(device)
  xs, wqs, wss, bs, k, n, s = case_shapes(experts, m, proj)
  dt = jnp.dtype(dtype)
  from jax.experimental.layout import Format, Layout

  def sd(shape, d):  # row-major, like device arrays given to jit (deviceless compiles otherwise pick
    #                  arbitrary entry layouts and insert relayout copies of the weights)
    return jax.ShapeDtypeStruct(shape, d, sharding=Format(Layout(tuple(range(len(shape)))), sh))
  epilogue = "swiglu" if proj == "gate_up" else None

  if gpu:
    from .triton import gmm_triton as kernel_fn
    tiling = common.triton_tiling(m, s)
  else:
    from .tpu import gmm_tpu as kernel_fn
    tiling = common.tpu_tiling(m, s)

  def f(x, wq, ws, gs, b, rw):
    w = layout.MXFP4GmmWeights(wq, ws, k, n, normal_scales=normal_scales)
    return kernel_fn(x, w, gs, b, rw, epilogue=epilogue, alpha=1.702, limit=7.0, out_dtype=dt)

  args = [sd(xs, dt), sd(wqs, jnp.int32), sd(wss, jnp.int32), sd((experts,), jnp.int32), sd(bs, dt),
          None if proj == "gate_up" else sd((m,), jnp.float32)]
  t0 = time.time()
  lowered = jax.jit(f, out_shardings=Format(Layout((0, 1)), sh)).lower(*args)
  compiled = lowered.compile()
  res = {"target": target, "experts": experts, "m": m, "proj": proj, "dtype": dtype,
         "fast_decode": normal_scales,
         "compile_s": round(time.time() - t0, 2), "tiling": {"bm": tiling.bm, "bn": tiling.bn}}
  ma = compiled.memory_analysis()
  if ma is not None:
    res["hbm_argument_bytes"] = ma.argument_size_in_bytes
    res["hbm_output_bytes"] = ma.output_size_in_bytes
    res["hbm_temp_bytes"] = ma.temp_size_in_bytes
  if not gpu:
    from .tpu import VMEM_LIMIT_BYTES, vmem_bytes
    res["vmem_bytes"] = vmem_bytes(m, wqs[2] * 8, n, s, dt.itemsize, dt.itemsize, tiling)
    res["vmem_limit_bytes"] = VMEM_LIMIT_BYTES
    res["vmem_physical_bytes"] = TPU_VMEM_BYTES[target]
    txt = compiled.as_text() or ""
    res["mosaic_custom_call"] = "tpu_custom_call" in txt
    # the kernel's pl.CostEstimate as serialised into the Mosaic custom call
    from ..cost import mosaic_cost_estimates
    res["cost_estimates"] = mosaic_cost_estimates(lowered.as_text())
  else:
    res["num_warps"] = tiling.num_warps
    res["num_stages"] = tiling.num_stages
  return res


def analyse_ptx(dump_dir: str, target: str = "h100") -> dict:
  files = [f for f in glob.glob(os.path.join(dump_dir, "*.ptx"))
           if ".entry mxfp4_gmm_triton" in Path(f).read_text()]
  if not files:
    return {"ptx_found": False}
  ptx = Path(files[0]).read_text()
  out = {"ptx_found": True, **gpu_targets.run_ptxas(files[0], target)}
  mma = gpu_targets.mma_instructions(ptx)
  out["mma_instructions"] = mma
  out["tf32_mma"] = any("tf32" in x for x in mma)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--target", required=True, choices=[*gpu_targets.TARGETS, *TPU_TOPOLOGIES])
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--m", type=int, required=True)
  ap.add_argument("--proj", choices=["gate_up", "down"], default="gate_up")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--exact-decode", action="store_true", help="general decoder (any E8M0 scale)")
  a = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as dump:
    gpu = a.target in gpu_targets.TARGETS
    if gpu:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
    res = run_case(a.target, a.experts, a.m, a.proj, a.dtype, normal_scales=not a.exact_decode)
    if gpu:
      res.update(analyse_ptx(dump, a.target))
  print("AOT_RESULT " + json.dumps(res))


def run_subprocess(target: str, experts: int, m: int, proj: str, dtype: str = "bfloat16",
                   timeout: int = 600, exact_decode: bool = False) -> dict:
  """Runs one case in a fresh `JAX_PLATFORMS=cpu` process and returns its JSON result."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-m", "pallas_kernels.mxfp4_gmm.aot", "--target", target,
                      "--experts", str(experts), "--m", str(m), "--proj", proj, "--dtype", dtype]
                     + (["--exact-decode"] if exact_decode else []),
                     capture_output=True, text=True, env=env, cwd=str(repo_root()), timeout=timeout)
  for line in p.stdout.splitlines():
    if line.startswith("AOT_RESULT "):
      return json.loads(line[len("AOT_RESULT "):])
  raise RuntimeError(f"AOT case failed (rc={p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
