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


def _header_error(path: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: invalid safetensors header: {msg}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header(path: str, header, data_start: int, file_size: int) -> tuple[dict, dict]:
    """The rules of the `safetensors` library: a JSON object of tensors (plus an optional
    `__metadata__` of strings); each with a known dtype, a shape of non-negative integers and
    `data_offsets` [begin, end] of non-negative integers spanning exactly its bytes; the tensors,
    ordered by offset, tile the data area from byte 0 to its end with no gap and no overlap.
    Returns (metadata, {name: (dtype, shape, begin, end)})."""
    if not isinstance(header, dict):
        raise _header_error(path, f"expected a JSON object, got a {type(header).__name__}")
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _header_error(path, "__metadata__ must be an object of strings")
    entries = {}
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r} (expected the keys "
                                  "dtype, shape, data_offsets)")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r} "
                                  "(a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r} "
                                  "(two non-negative integers, begin <= end)")
        (b, t), shape = offsets, tuple(shape)
        size_needed = nbytes(shape, dtype)
        if t - b != size_needed:
            raise CheckpointError(f"{path}: tensor {name!r} spans {t - b} bytes but "
                                  f"{dtype}{list(shape)} needs {size_needed}")
        entries[name] = (dtype, shape, b, t)
    end = 0
    for name, (_, _, b, t) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if b < end:
            raise _header_error(path, f"tensor {name!r} (bytes {b}..{t}) overlaps the tensor before it "
                                      f"(which ends at {end})")
        if b > end:
            raise _header_error(path, f"a gap of {b - end} bytes before tensor {name!r} (bytes {b}..{t})")
        if data_start + t > file_size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte "
                                  f"{data_start + t} but the file has {file_size} bytes")
        end = t
    if data_start + end != file_size:
        raise _header_error(path, f"the tensors cover {end} bytes but the data area has {file_size - data_start} "
                                  "(trailing bytes)")
    return metadata, entries


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
        self.data_start = 8 + n
        self.size = size
        self.metadata, self.entries = parse_header(path, header, self.data_start, size)
        self._mm = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._fd = os.dup(f.fileno())
        return self._mm

    def _check_size(self, name: str, end: int):
        """The file must still hold the tensor: touching mapped pages past a truncated end is SIGBUS."""
        now = os.fstat(self._fd).st_size
        if now != self.size or len(self._mm) < end:
            raise CheckpointError(f"{self.path}: the file changed size while being read ({self.size} -> {now} "
                                  f"bytes; tensor {name!r} needs bytes up to {end}): was it truncated or "
                                  "rewritten during the load?")

    def get(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of one tensor (the file size is checked again first)."""
        dtype, shape, b, t = self.entries[name]
        mm = self._map()
        self._check_size(name, self.data_start + t)
        return np.frombuffer(mm, dtype=ST_DTYPES[dtype], count=math.prod(shape),
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
            os.close(self._fd)


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

