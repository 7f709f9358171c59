"""Built-in tools of gpt-oss, run by `gptoss-jax serve` and `gptoss-jax chat` (`--tool python`,
`--tool browser`): the harmony `python` tool (a stateful Jupyter kernel per conversation: it runs
model-written code on this host) and the `browser` tool (search, open, find over a local folder or
the web). See docs/tools.md.

    box = make_toolbox(["python", "browser"], browser_dir="docs/")
    result = box.run(conversation_id, ToolCall("python", "print(1 + 1)", "analysis", "code"))
    result.messages   # harmony tool messages for the model
    box.close()       # every kernel stopped, every session folder removed
"""

from __future__ import annotations

from collections.abc import Sequence

from .backends import Backend, BackendError, Document, HttpBackend, LocalBackend, SearchHit, html_to_text
from .base import (DEFAULT_IDLE_S, DEFAULT_MAX_SESSIONS, DEFAULT_MAX_TOOL_CALLS, Tool, ToolResult, ToolSession,
                   Toolbox)
from .browser import BrowserSession, BrowserTool, Citation
from .python import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S, PythonSession, PythonTool

TOOL_NAMES = ("python", "browser")

__all__ = ["Backend", "BackendError", "BrowserSession", "BrowserTool", "Citation", "Document", "HttpBackend",
           "LocalBackend", "PythonSession", "PythonTool", "SearchHit", "TOOL_NAMES", "Tool", "ToolResult",
           "ToolSession", "Toolbox", "html_to_text", "make_toolbox"]


def make_toolbox(names: Sequence[str], *, browser_dir: str | None = None, search_api_key: str | None = None,
                 python_timeout_s: float = DEFAULT_TIMEOUT_S, python_memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS, idle_s: float = DEFAULT_IDLE_S,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> Toolbox | None:
    """The toolbox of the command-line flags (`--tool NAME` ..., `--browser-dir`, ...); None without tools.
    The browser reads `browser_dir` when given, else the web (search through `search_api_key`)."""
    unknown = sorted(set(names) - set(TOOL_NAMES))
    if unknown:
        raise ValueError(f"unknown tool(s) {unknown}: the built-in tools are {list(TOOL_NAMES)}")
    if browser_dir is not None and "browser" not in names:
        raise ValueError("--browser-dir needs --tool browser")
    if max_tool_calls < 1:
        raise ValueError(f"--max-tool-calls must be >= 1, got {max_tool_calls}")
    if not names:
        return None
    tools: list[Tool] = []
    try:
        for name in dict.fromkeys(names):  # in the order given, once each
            if name == "python":
                tools.append(PythonTool(timeout_s=python_timeout_s, memory_bytes=python_memory_bytes))
            else:
                backend = LocalBackend(browser_dir) if browser_dir is not None else \
                    HttpBackend(search_api_key=search_api_key)
                tools.append(BrowserTool(backend))
        return Toolbox(tools, idle_s=idle_s, max_sessions=max_sessions, max_tool_calls=max_tool_calls)
    except BaseException:
        for t in tools:
            t.close()
        raise
