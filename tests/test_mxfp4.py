"""MXFP4 decoding: bit-exact against transformers' convert_moe_packed_tensors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from pallas_kernels import mxfp4


def all_codes_all_scales():
    """Every byte value (so every pair of e2m1 codes) under every scale 0..254."""
    byte = np.arange(256, dtype=np.uint8).reshape(16, 16)
    blocks = np.broadcast_to(byte, (2, 255, 16, 16)).copy()
    scales = np.broadcast_to(np.arange(255, dtype=np.uint8)[None, :, None], (2, 255, 16)).copy()
    return blocks, scales


@pytest.mark.parametrize("jdt,tdt", [(jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)])
def test_dequantize_bit_exact(jdt, tdt):
    blocks, scales = all_codes_all_scales()
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=tdt)  # [E, K, N]
    ours = jnp.swapaxes(mxfp4.dequantize(jnp.asarray(blocks), jnp.asarray(scales), jdt), 1, 2)
    assert ours.dtype == jdt
    ref_bits = ref.view(torch.int16 if tdt == torch.bfloat16 else torch.int32).numpy()
    ours_bits = np.asarray(ours).view(np.int16 if jdt == jnp.bfloat16 else np.int32)
    np.testing.assert_array_equal(ours_bits, ref_bits)


def test_numpy_twin_bit_exact():
    blocks, scales = all_codes_all_scales()
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    ours = np.swapaxes(mxfp4.dequantize_np(blocks, scales), 1, 2)
    np.testing.assert_array_equal(ours.view(np.int32), ref.numpy().view(np.int32))


def test_low_nibble_is_even_element():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x72  # low nibble 2 (1.0) at element 0, high nibble 7 (6.0) at element 1
    out = mxfp4.dequantize_np(blocks, np.array([127], np.uint8))
    assert out[0] == 1.0 and out[1] == 6.0 and not out[2:].any()


def test_quantize_roundtrip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 128)).astype(np.float32) * 0.03
    blocks, scales = mxfp4.quantize_np(w)
    d = mxfp4.dequantize_np(blocks, scales)
    # the widest e2m1 step (4 -> 6) times a scale <= 2 * max/6 bounds the error by max/3 per block
    bmax = np.abs(w).reshape(6, 4, 32).max(-1, keepdims=True)
    assert (np.abs(d - w).reshape(6, 4, 32) <= bmax / 3 + 1e-9).all()
    b2, s2 = mxfp4.quantize_np(d)  # representable values are fixed points
    np.testing.assert_array_equal(mxfp4.dequantize_np(b2, s2), d)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        mxfp4.dequantize(jnp.zeros((4, 3, 16), jnp.uint8), jnp.zeros((4, 2), jnp.uint8))
