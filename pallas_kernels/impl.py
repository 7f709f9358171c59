"""The `impl=` vocabulary shared by every kernel package (`mxfp4_gmm`, `banded_attention`).

    impl                 kernel body   Pallas interpreter   where
    "auto"               (resolved)                         GPU -> "triton", TPU -> "mosaic",
                                                            otherwise the package's CPU default
    "triton"             Triton        no                   GPU
    "mosaic"             Mosaic TPU    no                   TPU
    "triton_interpret"   Triton        yes                  anywhere (CPU tests)
    "mosaic_interpret"   Mosaic TPU    yes                  anywhere (CPU tests)
    "reference"          pure jnp      -                    anywhere

Strings and `Impl` members are accepted everywhere (`Impl` is a `str` enum, so a member also
compares equal to its value). The old, package-dependent names "interpret",
"interpret-triton" and "interpret_mosaic" are rejected with the name that replaces them.
"""

from __future__ import annotations

import enum

__all__ = ["Impl", "resolve"]

# old name -> replacement; "interpret" meant the Mosaic body in mxfp4_gmm and the Triton body in
# banded_attention, hence no single replacement
_RENAMED = {
    "interpret": "'mosaic_interpret' (mxfp4_gmm's old 'interpret') or 'triton_interpret' "
                 "(banded_attention's old 'interpret')",
    "interpret-triton": "'triton_interpret'",
    "interpret_triton": "'triton_interpret'",
    "interpret_mosaic": "'mosaic_interpret'",
    "interpret-mosaic": "'mosaic_interpret'",
}


class Impl(str, enum.Enum):
  """Which kernel body runs, and whether under the Pallas interpreter."""

  AUTO = "auto"
  TRITON = "triton"
  MOSAIC = "mosaic"
  TRITON_INTERPRET = "triton_interpret"
  MOSAIC_INTERPRET = "mosaic_interpret"
  REFERENCE = "reference"

  def __str__(self) -> str:
    return self.value

  @classmethod
  def _missing_(cls, value):
    valid = ", ".join(repr(m.value) for m in cls)
    if isinstance(value, str) and value in _RENAMED:
      raise ValueError(f"impl={value!r} was renamed: use {_RENAMED[value]}; valid values: {valid}")
    raise ValueError(f"impl must be one of {valid}, got {value!r}")

  @property
  def interpret(self) -> bool:
    """True for the bodies run by the Pallas interpreter (`pallas_call(interpret=True)`)."""
    return self in (Impl.TRITON_INTERPRET, Impl.MOSAIC_INTERPRET)

  @property
  def body(self) -> Impl:
    """The kernel body: TRITON, MOSAIC or REFERENCE (the non-interpreted member, which equals
    the string "triton" / "mosaic" / "reference"). AUTO has none: resolve it first."""
    if self is Impl.AUTO:
      raise ValueError("Impl.AUTO has no kernel body: resolve it first (pallas_kernels.impl.resolve)")
    return _BODY[self]

_BODY = {Impl.TRITON: Impl.TRITON, Impl.TRITON_INTERPRET: Impl.TRITON, Impl.MOSAIC: Impl.MOSAIC,
         Impl.MOSAIC_INTERPRET: Impl.MOSAIC, Impl.REFERENCE: Impl.REFERENCE}


def resolve(impl: str | Impl, *, cpu_default: Impl) -> Impl:
  """`impl` as an `Impl`, with AUTO replaced by the backend's kernel: GPU -> TRITON,
  TPU -> MOSAIC, any other backend (CPU) -> `cpu_default`. Raises ValueError on unknown or
  renamed names."""
  impl = Impl(impl)
  cpu_default = Impl(cpu_default)
  if cpu_default is Impl.AUTO:
    raise ValueError("cpu_default must be a concrete impl, not 'auto'")
  if impl is not Impl.AUTO:
    return impl
  import jax
  backend = jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    return Impl.TRITON
  if backend == "tpu":
    return Impl.MOSAIC
  return cpu_default
