"""Atomic folder writes: everything goes to a temporary sibling that is renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False):
    """Yield a temporary sibling folder; rename it to `dst` only if the block succeeds."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(dst):
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

