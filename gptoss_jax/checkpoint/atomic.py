"""Atomic folder writes: everything goes to a temporary sibling that is renamed into place.

Temporaries are named `.<name>.gptoss-tmp-<host>-<pid>` next to the destination `<name>` (and a replaced
destination is parked as `.<name>.gptoss-old-<host>-<pid>` for the instant of the swap), so a later run
recognises those of a process that died (killed, power loss) and removes them; a parked old
destination whose replacement never arrived is renamed back. SIGTERM (and SIGHUP) raise SystemExit
while a temporary exists, SIGINT KeyboardInterrupt as usual, so the temporary is removed on the way out.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import threading
import time

from ..errors import same_or_nested
from .layout import ORBAX_MARKER

TMP_TAG, OLD_TAG = "gptoss-tmp", "gptoss-old"
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:48] or "host"
_PENDING: set[str] = set()  # temporaries of this process, removed again at exit (a writer thread may outlive us)


def scratch_name(name: str, tag: str = TMP_TAG, pid: int | None = None) -> str:
    return f".{name}.{tag}-{_HOST}-{os.getpid() if pid is None else pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_path(path: str):
    """Remove a file, link or folder tree; retried, in case a writer thread is still closing files."""
    for _ in range(5):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if not os.path.lexists(path):
            return
        time.sleep(0.05)


@atexit.register
def _remove_pending():
    for p in list(_PENDING):
        remove_path(p)


def clean_stale(parent: str, name: str) -> list[str]:
    """Remove the temporaries for `parent/name` left by dead processes of this host; a parked old
    destination whose replacement never arrived goes back into place. Returns what was handled."""
    pat = re.compile(rf"^\.{re.escape(name)}\.({TMP_TAG}|{OLD_TAG})-{_HOST}-(\d+)$")
    dst, done = os.path.join(parent, name), []
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return done
    for entry in sorted(entries, key=lambda e: OLD_TAG in e):  # temporaries first, then parked olds
        m = pat.match(entry)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == OLD_TAG and not os.path.lexists(dst):
            os.rename(path, dst)  # interrupted mid-swap: the previous destination comes back
        else:
            remove_path(path)
        done.append(path)
    return done


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM / SIGHUP raise SystemExit (so `finally` blocks run) while the block runs, in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM / SIGHUP back while the block runs; the first one that came is raised right
    after it (through the handlers in force before). For work a signal must not cut in half: a rename
    swap, or a library call whose writer threads would otherwise outlive the temporary they write into.
    Python-level (a thread's signal mask would not do: any thread may take the signal)."""
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        if caught:
            signal.raise_signal(caught[0])


@contextlib.contextmanager
def scratch_dir(parent: str, name: str):
    """A fresh temporary folder `parent/.<name>.gptoss-tmp-<host>-<pid>`, removed when the block ends
    however it ends (exception, Ctrl-C, SIGTERM); stale ones of dead processes are removed first."""
    parent = os.path.abspath(parent)
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent, name)
    tmp = os.path.join(parent, scratch_name(name))
    remove_path(tmp)
    _PENDING.add(tmp)
    try:
        with _signals_raise():
            os.makedirs(tmp)
            yield tmp
    finally:
        remove_path(tmp)
        if not os.path.lexists(tmp):
            _PENDING.discard(tmp)


def _replaceable(dst: str) -> bool:
    """What --overwrite may replace: a file, an empty folder, or a checkpoint folder (config.json or
    our marker); never a folder of other things (a typo for its parent must not delete it)."""
    if not os.path.isdir(dst):
        return True
    entries = os.listdir(dst)
    return not entries or "config.json" in entries or ORBAX_MARKER in entries


def check_destination(dst: str, overwrite: bool = False, *, source: str | None = None) -> str:
    """The checks of `atomic_dir`, before any work: returns the absolute destination."""
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    if source is not None and same_or_nested(dst, source):
        raise ValueError(f"destination {dst} is the source {source}, inside it or holds it: choose another folder")
    if os.path.lexists(dst):
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
        if not _replaceable(dst):
            raise FileExistsError(f"{dst} is a folder that is neither empty nor a checkpoint (no config.json): "
                                  "refusing to replace it; remove it yourself or choose another destination")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False, *, source: str | None = None):
    """Yield a temporary sibling folder; rename it to `dst` only if the block succeeds.

    `source`: a path the result is made from; a destination that is it, lies inside it or holds it
    is refused (replacing it would delete the source)."""
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    parent, name = os.path.split(dst)
    clean_stale(parent, name)  # may put back a destination an interrupted swap had parked
    check_destination(dst, overwrite, source=source)
    with scratch_dir(parent, name) as tmp:
        yield tmp
        with signals_deferred():
            if os.path.lexists(dst):
                check_destination(dst, overwrite, source=source)  # it may have appeared meanwhile
                old = os.path.join(parent, scratch_name(name, OLD_TAG))
                os.rename(dst, old)
                try:
                    os.rename(tmp, dst)
                except BaseException:
                    os.rename(old, dst)
                    raise
                remove_path(old)
            else:
                os.rename(tmp, dst)
