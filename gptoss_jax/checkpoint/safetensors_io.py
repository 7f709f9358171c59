"""Safetensors, read and written by hand: lazy per-tensor reads through a memory map, exact
truncation checks, bf16, streamed writes (one tensor in memory at a time)."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16, "U8": np.uint8,
             "I8": np.int8, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_, "F64": np.float64}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


def nbytes(shape, dtype: str) -> int:
    """Bytes of a tensor of `shape` in safetensors dtype `dtype`."""
    return math.prod(shape) * np.dtype(ST_DTYPES[dtype]).itemsize


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header "
                                      f"(header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, t) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}") from None
            if dtype not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            size_needed = nbytes(shape, dtype)
            if t - b != size_needed:
                raise CheckpointError(f"{path}: tensor {name!r} spans {t - b} bytes but "
                                      f"{dtype}{list(shape)} needs {size_needed}")
            if self.data_start + t > size:
                raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self.data_start + t} but the file has {size} bytes")
            self.entries[name] = (dtype, shape, b, t)
        self._mm = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of one tensor."""
        dtype, shape, b, t = self.entries[name]
        return np.frombuffer(self._map(), dtype=ST_DTYPES[dtype], count=math.prod(shape),
                             offset=self.data_start + b).reshape(shape)

    def release(self, name: str):
        """Drop the tensor's pages from this process's resident memory (they re-read from the file
        if touched again), so streaming a checkpoint keeps host memory near one tensor."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, b, t = self.entries[name]
        start = (self.data_start + b) // mmap.PAGESIZE * mmap.PAGESIZE
        self._mm.madvise(mmap.MADV_DONTNEED, start, self.data_start + t - start)

    def close(self):
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None):
    """Streamed writer: (name, shape, dtype name, producer) -> file; one tensor in memory at a time.
    A producer returning None leaves that tensor as a hole of zeros (sparse file)."""
    tensors = list(tensors)
    header, off = {}, 0
    for name, shape, dtype, _ in tensors:
        n = nbytes(shape, dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps({"__metadata__": metadata or {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            arr = produce()
            if arr is None:  # all zeros: leave a hole (sparse file)
                f.seek(nbytes(shape, dtype), os.SEEK_CUR)
                continue
            arr = np.ascontiguousarray(arr, dtype=ST_DTYPES[dtype])
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {arr.shape}, expected {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        f.truncate(f.tell())

