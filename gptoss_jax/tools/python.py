"""The harmony `python` tool: a stateful Jupyter kernel per conversation (jupyter_client + ipykernel).

It runs model-written code on this host, as the user that started the server: the kernel is NOT a
sandbox. What it does bound:

* time: each call has a timeout (default 30 s); then the kernel is interrupted (SIGINT to its process
  group), and killed and restarted if it has not stopped within a grace period (its state is lost);
* memory: the kernel process gets RLIMIT_AS (address space, default 4 GiB), so a huge allocation
  raises MemoryError in the kernel instead of exhausting the host;
* output: what the model reads is cut to `max_output_chars` (head and tail kept, with a note);
* environment: the kernel starts with an allow-listed environment (PATH, locale, time zone), its
  HOME and TMPDIR in the session's private folder: no API keys or other secrets of the server's
  environment reach it;
* files: the working directory is the session's own folder, which the model knows as `/mnt/data`
  (the harmony python tool's drive: the string `/mnt/data` in the code is that folder, and the
  folder's path in the output reads `/mnt/data`); the folder is deleted when the session closes;
* processes: the kernel talks over IPC sockets in the session's private folder (no TCP port), runs
  in its own process group (killed as a whole on close) and exits if the server dies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time

import openai_harmony as oh

from ..harmony import ToolCall
from .base import Tool, ToolResult, ToolSession, answer

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MEMORY_BYTES = 4 << 30  # RLIMIT_AS: an idle ipykernel maps ~0.8 GiB, numpy and threads more
DEFAULT_MAX_OUTPUT_CHARS = 16_000  # about 4k tokens of the model's context
DEFAULT_INTERRUPT_GRACE_S = 5.0  # after the interrupt, the kernel has this long to stop before a restart
DEFAULT_STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.2  # how often a running call checks that its kernel lives
MOUNT = "/mnt/data"  # the harmony python tool's drive, as the model was trained to use it
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
# RLIMIT_AS counts reserved address space: malloc arenas (64 MiB per thread) and a BLAS buffer per core
# would spend it on a many-core host before the code allocates anything
KERNEL_THREADS = dict(MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="4", OMP_NUM_THREADS="4", MKL_NUM_THREADS="4")
KERNEL_NAME = "gptoss-python"
# The kernel's launcher: the memory limit, then ipykernel, without the working folder on sys.path (a
# file the model wrote there must not shadow a module).
_LAUNCH = ("import resource, sys\n"
           "n = int(sys.argv.pop(1))\n"
           "if n > 0: resource.setrlimit(resource.RLIMIT_AS, (n, n))\n"
           "if sys.path and sys.path[0] in ('', '.'): sys.path.pop(0)\n"
           "from ipykernel.kernelapp import launch_new_instance\n"
           "launch_new_instance()\n")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _require_jupyter():
    missing = [m for m in ("jupyter_client", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"the python tool needs {' and '.join(missing)}: pip install 'gptoss-jax[tools]'")


class _Capped:
    """Text kept within `limit` characters: its head and its tail, and how much was dropped between."""

    def __init__(self, limit: int):
        self.limit, self.head_max = limit, limit // 2
        self.head: list[str] = []
        self.head_len, self.tail, self.total = 0, "", 0

    def add(self, s: str) -> None:
        self.total += len(s)
        if self.head_len < self.head_max:
            take = s[:self.head_max - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            s = s[len(take):]
        if s:
            self.tail = (self.tail + s)[-(self.limit - self.head_max):]

    def text(self) -> str:
        head = "".join(self.head)
        dropped = self.total - len(head) - len(self.tail)
        if dropped <= 0:
            return head + self.tail
        return f"{head}\n[... {dropped} characters of output truncated ...]\n{self.tail}"


class PythonTool(Tool):
    """The `python` namespace. Off unless enabled (`--tool python`): it runs model-written code on the host.

    timeout_s: per call; memory_bytes: the kernel's RLIMIT_AS (0: none); max_output_chars: what the
    model reads of a call's output; interrupt_grace_s: how long an interrupted call may take to stop."""

    name = "python"

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
                 interrupt_grace_s: float = DEFAULT_INTERRUPT_GRACE_S,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S, python: str = sys.executable):
        if timeout_s <= 0 or interrupt_grace_s <= 0 or startup_timeout_s <= 0:
            raise ValueError("the python tool's timeouts must be > 0")
        if memory_bytes < 0 or max_output_chars < 100:
            raise ValueError(f"memory_bytes must be >= 0 and max_output_chars >= 100, got {memory_bytes}, "
                             f"{max_output_chars}")
        _require_jupyter()
        from jupyter_client.kernelspec import KernelSpecManager

        self.timeout_s, self.memory_bytes, self.max_output_chars = timeout_s, memory_bytes, max_output_chars
        self.interrupt_grace_s, self.startup_timeout_s = interrupt_grace_s, startup_timeout_s
        # our kernel spec (the launcher above, no colors, no history file) in a private folder
        self._spec_root = tempfile.mkdtemp(prefix="gptoss-kernelspec-")
        spec_dir = os.path.join(self._spec_root, KERNEL_NAME)
        os.mkdir(spec_dir)
        argv = [python, "-c", _LAUNCH, str(memory_bytes), "-f", "{connection_file}",
                "--InteractiveShell.colors=nocolor", "--HistoryManager.enabled=False"]
        with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
            json.dump({"argv": argv, "display_name": "gptoss-jax python tool", "language": "python"}, f)
        self.spec_manager = KernelSpecManager(kernel_dirs=[self._spec_root], ensure_native_kernel=False)

    def namespace_config(self) -> oh.ToolNamespaceConfig:
        # harmony's own description of the tool (the text the model was trained on), with our timeout
        desc = oh.ToolNamespaceConfig.python().description
        desc = re.sub(r"time out after [\d.]+ seconds", f"time out after {self.timeout_s:g} seconds", desc)
        return oh.ToolNamespaceConfig(name=self.name, description=desc, tools=[])

    def open_session(self) -> "PythonSession":
        return PythonSession(self)

    def close(self) -> None:
        shutil.rmtree(self._spec_root, ignore_errors=True)


class PythonSession(ToolSession):
    """One conversation's kernel and folder: `root` (private, 0700) holds `data` (the kernel's working
    directory, the model's /mnt/data), `home`, `tmp`, the IPC sockets and the kernel's log."""

    def __init__(self, tool: PythonTool):
        self.tool = tool
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="gptoss-python-"))  # as the kernel's getcwd() says
        self.data = os.path.join(self.root, "data")
        for d in ("data", "home", "tmp"):
            os.mkdir(os.path.join(self.root, d))
        self._km = self._kc = None
        self._closed = False
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # ---- the kernel -----------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The kernel's whole environment: allow-listed variables only, home and temp in the session."""
        env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
        env.update(HOME=os.path.join(self.root, "home"), TMPDIR=os.path.join(self.root, "tmp"),
                   PYTHONNOUSERSITE="1", MPLBACKEND="Agg", **KERNEL_THREADS)
        return env

    def _start(self) -> None:
        from jupyter_client import KernelManager

        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=self.tool.spec_manager, transport="ipc",
                           ip=os.path.join(self.root, "kernel"))
        with open(os.path.join(self.root, "kernel.log"), "ab") as log:
            km.start_kernel(env=self.env(), cwd=self.data, stdout=subprocess.DEVNULL, stderr=log)
        self._km = km
        kc = km.blocking_client()
        kc.start_channels()
        self._kc = kc
        try:
            kc.wait_for_ready(timeout=self.tool.startup_timeout_s)
        except RuntimeError as e:  # died or timed out while starting
            raise RuntimeError(f"the python kernel did not start ({e}): {self._log_tail()}") from e

    def _log_tail(self, n: int = 1000) -> str:
        try:
            with open(os.path.join(self.root, "kernel.log"), errors="replace") as f:
                return f.read()[-n:].strip() or "(no log)"
        except OSError:
            return "(no log)"

    def _stop(self) -> None:
        kc, km, self._kc, self._km = self._kc, self._km, None, None
        if kc is not None:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        if km is not None:
            with contextlib.suppress(Exception):
                km.shutdown_kernel(now=True)  # SIGKILL to the kernel's process group
            with contextlib.suppress(Exception):
                km.cleanup_resources()

    def restart(self) -> None:
        """A fresh kernel (the state is lost; the files stay)."""
        self._stop()
        self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def _process(self) -> subprocess.Popen | None:
        # our kernel spec names no provisioner: jupyter_client's LocalProvisioner, which holds the Popen
        return self._km.provisioner.process if self._km is not None and self._km.provisioner is not None else None

    def _exit_status(self) -> str:
        p = self._process
        code = p.poll() if p is not None else None
        if code is None:
            return "exit status unknown"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- running --------------------------------------------------------------------------------------
    def run(self, call: ToolCall) -> ToolResult:
        if self._closed:
            return answer("python", "The python session is closed.", call, failed=True)
        code = call.arguments.replace(MOUNT, self.data)
        if self._km is None:  # a restart that failed earlier: try once more
            self._start()
        text, note, failed = self._execute(code)
        text = text.replace(self.data, MOUNT)
        if note:
            text = f"{text.rstrip()}\n[{note}]" if text.strip() else f"[{note}]"
        return answer("python", text, call, failed=failed)

    def _execute(self, code: str) -> tuple[str, str, bool]:
        """(output, note, failed): the output as the model reads it, a note on the call, and whether it
        failed (timed out, or the kernel died); code that raises has its traceback as the output."""
        tool, km, kc = self.tool, self._km, self._kc
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        out = _Capped(tool.max_output_chars)
        deadline = time.monotonic() + tool.timeout_s
        interrupted = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if not interrupted:
                    interrupted = True
                    with contextlib.suppress(Exception):
                        km.interrupt_kernel()
                    deadline = time.monotonic() + tool.interrupt_grace_s
                    continue
                self.restart()
                return (out.text(), f"the call timed out after {tool.timeout_s:g} s and the kernel did not stop "
                                    f"when interrupted: it was restarted, and its state is lost", True)
            try:
                msg = kc.get_iopub_msg(timeout=min(left, POLL_S))
            except queue.Empty:
                if not km.is_alive():
                    status = self._exit_status()
                    self.restart()
                    return (out.text(), f"the python kernel died ({status}) and was restarted: its state is lost",
                            True)
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.add(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                data = content.get("data", {})
                text = data.get("text/plain")
                if text is not None:
                    out.add(text if text.endswith("\n") else text + "\n")
                shown = [k for k in data if k != "text/plain"]
                if shown and text is None:
                    out.add(f"[{', '.join(shown)} output not shown]\n")
            elif kind == "error":  # the code raised: its traceback is the output (the call did its job)
                tb = content.get("traceback") or [f"{content.get('ename', '')}: {content.get('evalue', '')}"]
                out.add(_ANSI.sub("", "\n".join(tb)) + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                break
        self._drain_shell()
        if interrupted:
            return out.text(), f"the call timed out after {tool.timeout_s:g} s and was interrupted", True
        return out.text(), "" if out.total else "no output", False

    def _drain_shell(self) -> None:
        """Drop the execute replies (what they say came on iopub) so they do not pile up."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._kc.get_shell_msg(timeout=0)
