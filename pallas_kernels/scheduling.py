"""Buffers XLA must not create early.

XLA:GPU merges operand-free initialisers (the zero fill of a scan's or a loop's output buffer) of every
layer into one fusion at the start of the program, so the buffers of all layers are live at once (a
gpt-oss-20b prefill: 24 x 130 MB; a 120b fine-tuning step: 36 x 1 GB of dense expert weights). A buffer
created behind an optimization barrier with a value of its own layer cannot be created before that
value exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def zeros_after(anchor, *shapes_dtypes):
  """Zero arrays of the given (shape, dtype)s that cannot be created before `anchor` exists."""
  zeros = tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes_dtypes)
  return jax.lax.optimization_barrier((anchor, zeros))[1]
