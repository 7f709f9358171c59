"""The built-in tool interface and the per-conversation sessions that run tools.

A `Tool` is what the model is told about (a harmony namespace in the system message) and a factory of
`ToolSession`s: the state of one conversation (a python kernel, a browser's page stack). A session's
`run(call)` takes the model's call message and answers with harmony tool messages; it never raises
for the model's mistakes or the tool's failures (a syntax error, a timeout, a dead kernel, a missing
page): those come back as text the model reads, and the request goes on.

`Toolbox` holds the enabled tools and the open sessions, keyed by conversation: one lock per session
(calls of one conversation run one at a time), sessions closed when idle, the least recently used one
closed past a bound, all of them closed by `close()`.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import openai_harmony as oh

from ..harmony import ChatMessage, ToolCall

log = logging.getLogger("gptoss_jax.tools")

DEFAULT_IDLE_S = 600.0  # a conversation's sessions close after this long unused
DEFAULT_MAX_SESSIONS = 16  # open sessions over all conversations (each python one is a process)
DEFAULT_MAX_TOOL_CALLS = 32  # built-in calls per request (OpenAI's launch demo chained 27 browser calls)


@dataclass
class ToolResult:
    """What a call gave. messages: the harmony tool messages for the model; output: their text, as the
    API reports it; failed: the call did not do its job (the text says why); action: tool-specific facts
    for the API (the browser's search query or opened URL)."""

    messages: list[ChatMessage]
    output: str
    failed: bool = False
    action: dict | None = None


def tool_message(author: str, text: str, call: ToolCall) -> ChatMessage:
    """A tool's answer to `call`: from `author` (e.g. "python", "browser.search") to the assistant, on
    the call's channel (as harmony's reference tools answer)."""
    return ChatMessage("tool", text, channel=call.channel or "analysis", recipient="assistant", name=author)


def answer(author: str, text: str, call: ToolCall, failed: bool = False, action: dict | None = None) -> ToolResult:
    return ToolResult([tool_message(author, text, call)], text, failed, action)


class ToolSession(abc.ABC):
    """One conversation's state for one tool. Not thread-safe: the Toolbox runs one call at a time."""

    @abc.abstractmethod
    def run(self, call: ToolCall) -> ToolResult:
        """Run the model's call; failures are answered, not raised."""

    def close(self) -> None:
        """Free what the session holds (processes, folders). Idempotent."""


class Tool(abc.ABC):
    """A built-in tool: `name` is its harmony namespace ("python", "browser"), addressed as `name` or
    `name.function`."""

    name: str

    @abc.abstractmethod
    def namespace_config(self) -> oh.ToolNamespaceConfig:
        """The namespace declared in the harmony system message."""

    @abc.abstractmethod
    def open_session(self) -> ToolSession:
        """A new conversation's state (may be slow: the Toolbox calls it on a worker thread)."""

    def preview(self, call: ToolCall, session: ToolSession | None) -> dict | None:
        """What the call will do, before it runs (for the API's in-progress item), read from the
        conversation's session if it has one; None: nothing to say."""
        return None

    def handles(self, recipient: str | None) -> bool:
        return recipient is not None and (recipient == self.name or recipient.startswith(self.name + "."))

    def close(self) -> None:
        """Free tool-wide resources (after every session closed)."""


@dataclass
class _Entry:
    session: ToolSession | None  # None while it opens
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    busy: int = 0


class Toolbox:
    """The enabled tools and their sessions by conversation (any hashable key: a response chain, a chat).

    idle_s: a session unused this long is closed (by a reaper thread); max_sessions: past it the least
    recently used idle session is closed; max_tool_calls: the default bound on built-in calls per request."""

    def __init__(self, tools: Sequence[Tool], *, idle_s: float = DEFAULT_IDLE_S,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS):
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"each tool may be enabled once, got {names}")
        if max_sessions < 1 or max_tool_calls < 1 or idle_s <= 0:
            raise ValueError("max_sessions and max_tool_calls must be >= 1 and idle_s > 0")
        self.tools = {t.name: t for t in tools}
        self.idle_s, self.max_sessions, self.max_tool_calls = idle_s, max_sessions, max_tool_calls
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="gptoss-tools-reaper", daemon=True)
        self._reaper.start()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tools)

    def configs(self, names: Collection[str]) -> list[oh.ToolNamespaceConfig]:
        """The namespaces of `names` (in the toolbox's order) for the system message."""
        return [t.namespace_config() for n, t in self.tools.items() if n in names]

    def route(self, recipient: str | None, names: Collection[str]) -> str | None:
        """The name of the declared tool that `recipient` addresses, or None."""
        for n in names:
            if n in self.tools and self.tools[n].handles(recipient):
                return n
        return None

    # ---- running ------------------------------------------------------------------------------------
    def run(self, conversation, call: ToolCall) -> ToolResult:
        """Run `call` in `conversation`'s session of the tool it addresses (opened on first use). Blocks
        for as long as the tool takes (the python tool bounds it by its timeout); never raises."""
        name = self.route(call.recipient, self.tools)
        if name is None:
            return answer(call.recipient, f"Unknown tool {call.recipient!r}: the tools are {list(self.tools)}.",
                          call, failed=True)
        try:
            with self._session(conversation, name) as session:
                return session.run(call)
        except Exception as e:  # a tool bug or a session that would not open: the model is told, we serve on
            log.exception("tool %s failed", call.recipient)
            return answer(call.recipient, f"The {name} tool failed: {type(e).__name__}: {e}", call, failed=True)

    def preview(self, conversation, call: ToolCall) -> dict | None:
        name = self.route(call.recipient, self.tools)
        if name is None:
            return None
        try:
            return self.tools[name].preview(call, self.session(conversation, name))
        except Exception:
            log.exception("tool %s preview failed", call.recipient)
            return None

    def session(self, conversation, name: str) -> ToolSession | None:
        """The open session of `name` in `conversation`, if any (to read its state, e.g. citations)."""
        with self._lock:
            entry = self._entries.get((conversation, name))
            return entry.session if entry is not None else None

    # ---- sessions -----------------------------------------------------------------------------------
    class _Use:
        def __init__(self, box: "Toolbox", key: tuple):
            self.box, self.key = box, key

        def __enter__(self) -> ToolSession:
            box = self.box
            with box._lock:
                if box._closed.is_set():
                    raise RuntimeError("the toolbox is closed")
                entry = box._entries.get(self.key)
                if entry is None:
                    box._make_room()
                    entry = box._entries[self.key] = _Entry(None)
                entry.busy += 1
            self.entry = entry
            entry.lock.acquire()
            try:
                if entry.session is None:
                    entry.session = box.tools[self.key[1]].open_session()
                return entry.session
            except BaseException:
                self.__exit__(None, None, None)
                raise

        def __exit__(self, *exc):
            entry = self.entry
            entry.last_used = time.monotonic()
            entry.lock.release()
            with self.box._lock:
                entry.busy -= 1
                stale = self.box._closed.is_set() or self.box._entries.get(self.key) is not entry
            if stale:  # the toolbox closed, or the session was dropped while this call ran
                self.box._close_entry(entry)

    def _session(self, conversation, name: str) -> "_Use":
        return Toolbox._Use(self, (conversation, name))

    def _make_room(self) -> None:
        """Under the lock: close the least recently used idle session while at the bound."""
        while len(self._entries) >= self.max_sessions:
            idle = [(e.last_used, k) for k, e in self._entries.items() if e.busy == 0]
            if not idle:
                raise RuntimeError(f"all {self.max_sessions} tool sessions are busy: try again later")
            key = min(idle)[1]
            self._close_entry_later(self._entries.pop(key))

    def _close_entry_later(self, entry: _Entry) -> None:
        threading.Thread(target=self._close_entry, args=(entry,), daemon=True).start()

    @staticmethod
    def _close_entry(entry: _Entry) -> None:
        with entry.lock:
            session, entry.session = entry.session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                log.exception("closing a tool session failed")

    def end(self, conversation) -> None:
        """Close `conversation`'s sessions (a call running in one closes it when it returns)."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == conversation]
            entries = [(self._entries.pop(k)) for k in keys]
        for e in entries:
            if e.busy == 0:
                self._close_entry(e)

    def open_sessions(self) -> int:
        with self._lock:
            return sum(e.session is not None for e in self._entries.values())

    def reap(self) -> int:
        """Close the sessions idle for `idle_s`; returns how many."""
        now = time.monotonic()
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.busy == 0 and now - e.last_used >= self.idle_s]
            entries = [self._entries.pop(k) for k in keys]
        for e in entries:
            self._close_entry(e)
        return len(entries)

    def _reap_loop(self) -> None:
        period = min(max(self.idle_s / 4, 0.05), 30.0)
        while not self._closed.wait(period):
            try:
                self.reap()
            except Exception:
                log.exception("closing idle tool sessions failed")

    def close(self) -> None:
        """Close every session and tool (a call still running closes its session when it returns).
        Idempotent."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            entries, self._entries = list(self._entries.values()), {}
        for e in entries:
            if e.busy == 0:
                self._close_entry(e)
        self._reaper.join(5)
        for t in self.tools.values():
            try:
                t.close()
            except Exception:
                log.exception("closing the %s tool failed", t.name)

    def __enter__(self) -> "Toolbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
