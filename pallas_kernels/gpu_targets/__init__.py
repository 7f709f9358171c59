"""NVIDIA GPU target descriptions for deviceless compiles, and the CUDA tools that check them.

Each `<name>.txtpb` here is an XLA `GpuTargetConfigProto` (the format XLA writes for a real device):
the JAX CUDA plugin compiles for that GPU from it, with no GPU present
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`). They ship
inside the package (package data), so an installed wheel plans for every target. The H100 file is
the description XLA wrote for a real device; the others are written from the vendors' published
specifications, cited in each file's header.

    topology_devices("t4", 1)            compile-only devices of that GPU
    device_info("l4")                    {"device_memory_size": ..., "memory_bandwidth": ..., ...}
    ptxas_path()                         ptxas of the installed `nvidia-cuda-nvcc-cu12` wheel (or None)
    run_ptxas(ptx_file, "a100-40g")      `ptxas -arch=<the target's sm> -v`: registers, spills

Needs the `aot` extra (jax-cuda12-plugin, nvidia-cuda-nvcc-cu12) for compiles and ptxas; reading
the descriptions needs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import os
import re
import subprocess
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  name: str  # the `--target` name
  file: str  # the txtpb in this package
  ptxas_arch: str  # what XLA compiles the PTX for (sm_90a: wgmma needs the arch-specific target)


TARGETS = {t.name: t for t in (
    GpuTarget("h100", "h100.txtpb", "sm_90a"),
    GpuTarget("a100-80g", "a100_80g.txtpb", "sm_80"),
    GpuTarget("a100-40g", "a100_40g.txtpb", "sm_80"),
    GpuTarget("l4", "l4.txtpb", "sm_89"),
    GpuTarget("t4", "t4.txtpb", "sm_75"),
)}


def _target(name: str) -> GpuTarget:
  if name not in TARGETS:
    raise ValueError(f"GPU target must be one of {sorted(TARGETS)}, got {name!r}")
  return TARGETS[name]


def target_config(name: str) -> str:
  """The target description (txtpb text) of a GPU target, read from the installed package."""
  return importlib.resources.files(__name__).joinpath(_target(name).file).read_text()


def device_info(name: str) -> dict:
  """The scalar fields of the description's `gpu_device_info` (ints / floats by name) plus
  `compute_capability` (major, minor) and `description` (the device string)."""
  text = target_config(name)
  info: dict = {}
  for key, value in re.findall(r"^\s*(\w+):\s*([0-9.]+)\s*$", text, flags=re.M):
    info.setdefault(key, float(value) if "." in value else int(value))
  cc = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
  major = re.search(r"major:\s*(\d+)", cc.group(1)) if cc else None
  minor = re.search(r"minor:\s*(\d+)", cc.group(1)) if cc else None
  info["compute_capability"] = (int(major.group(1)) if major else 0, int(minor.group(1)) if minor else 0)
  desc = re.search(r'device_description_str:\s*"([^"]*)"', text)
  info["description"] = desc.group(1) if desc else name
  return info


def topology_devices(name: str, n: int = 1):
  """n compile-only devices of the GPU target (one host of up to 8 GPUs, then hosts of 8)."""
  from jax.experimental import topologies

  shape = f"1x1x{n}" if n <= 8 else f"1x{-(-n // 8)}x8"
  topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(name), topology=shape)
  devices = list(topo.devices)
  if len(devices) < n:
    raise ValueError(f"topology for {name} has {len(devices)} devices, need {n}")
  return devices[:n]


def _nvcc_bin() -> Path | None:
  """bin/ of the installed `nvidia-cuda-nvcc-cu12` wheel (ptxas, nvlink), wherever the venv is."""
  spec = importlib.util.find_spec("nvidia.cuda_nvcc")
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    if (Path(loc) / "bin").is_dir():
      return Path(loc) / "bin"
  return None


def ptxas_path() -> str | None:
  """ptxas of the `aot` extra's nvcc wheel (never a PATH lookup: it must match what XLA used)."""
  b = _nvcc_bin()
  p = None if b is None else b / "ptxas"
  return str(p) if p is not None and os.access(p, os.X_OK) else None


def cuda_toolchain_available() -> bool:
  """The JAX CUDA plugin (compiles) and ptxas (register / spill figures) are installed."""
  return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None and ptxas_path() is not None


def parse_ptxas(text: str) -> dict:
  """Registers and spill bytes of the last kernel in `ptxas -v` output."""
  regs = re.findall(r"Used (\d+) registers", text)
  st = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
  return {"registers": int(regs[-1]) if regs else None,
          "spill_store_bytes": int(st[-1][0]) if st else None,
          "spill_load_bytes": int(st[-1][1]) if st else None}


def mma_instructions(ptx: str) -> list[str]:
  """The tensor-core instructions of a PTX text (wgmma on sm_90a, mma.sync from sm_75 up)."""
  return sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[a-z0-9._]*", ptx)))


def run_ptxas(ptx_file: str, name: str) -> dict:
  """Assemble one PTX file for the target with `ptxas -v`: return code, registers, spills."""
  ptxas = ptxas_path()
  if ptxas is None:
    raise FileNotFoundError("ptxas not found: install the `aot` extra (nvidia-cuda-nvcc-cu12)")
  p = subprocess.run([ptxas, f"-arch={_target(name).ptxas_arch}", "-v", ptx_file, "-o", os.devnull],
                     capture_output=True, text=True)
  return {"ptxas_rc": p.returncode, **parse_ptxas(p.stdout + p.stderr),
          **({"ptxas_error": (p.stdout + p.stderr)[-2000:]} if p.returncode else {})}
