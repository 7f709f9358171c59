"""Helpers for the `pl.CostEstimate` every kernel attaches to its `pallas_call`."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp


def nbytes(*arrays) -> int:
  """Total bytes of arrays / ShapeDtypeStructs (None entries count 0)."""
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays if a is not None)


_QUOTE = r'(?:\\22|\\"|")'
_BLOCK = re.compile(r"cost_estimate" + _QUOTE + r"\s*:\s*\{(.*?)\}", re.S)
_FIELD = re.compile(r"(bytes_accessed|flops|transcendentals|remote_bytes_transferred)" + _QUOTE
                    + r"?\s*:\s*(\d+)")


def mosaic_cost_estimates(text: str) -> list[dict]:
  """The cost estimates serialised into the Mosaic TPU custom calls' backend_config of a lowered
  or compiled module's text (`jax.jit(f).lower(...).as_text()`), in program order."""
  return [{k: int(v) for k, v in _FIELD.findall(body)} for body in _BLOCK.findall(text)]


def _pallas_calls(jaxpr, found):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn.params)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          _pallas_calls(sub, found)
  return found


def traced_cost_estimates(fn, *args, **kwargs) -> list[tuple[str, object]]:
  """(kernel name, `pl.CostEstimate` or None) of every `pallas_call` in `jax.make_jaxpr(fn)`,
  in program order (tracing only: works for any impl on any backend)."""
  import jax
  jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
  out = []
  for p in _pallas_calls(jaxpr, []):
    name = p.get("name_and_src_info")
    out.append((getattr(name, "name", None) or p.get("name"), p.get("cost_estimate")))
  return out
