"""The harmony `browser` tool: `browser.search`, `browser.open`, `browser.find` over a `Backend`.

Each call shows a page and gives it a cursor (its index in the conversation's history):

    [3] Intro to JAX (guide/jax.md)
    **viewing lines [0 - 41] of 120**

    L0: # Intro to JAX
    L1: ...

Lines are the page's text wrapped at `line_width` columns; a window holds about `view_tokens` tokens
(or `num_lines` lines). Links are `【id†text】` markers that `open(id=...)` follows; search and find
results are pages of such links. The model cites what it read as `【cursor†Lstart-Lend】`, which
`BrowserSession.citations` maps back to the page and its lines.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from urllib.parse import quote, urlparse

import openai_harmony as oh

from ..harmony import ToolCall
from ..tokenizer import load_tokenizer
from .backends import Backend, BackendError, Document
from .base import Tool, ToolResult, ToolSession, answer

DEFAULT_VIEW_TOKENS = 1024  # a window's size when the call gives no num_lines
DEFAULT_TOPN = 10
MAX_TOPN = 20
LINE_WIDTH = 80
MAX_FIND_RESULTS = 50
FIND_CONTEXT_LINES = 4  # lines shown under each find match
OPEN_ABOVE_TARGET = 4  # a link to a line opens this many lines above it
MAX_HISTORY = 512  # pages (cursors) per conversation
CITATION = re.compile(r"【(\d+)†L(\d+)(?:-L(\d+))?】")
FUNCTIONS = ("search", "open", "find")


class UsageError(Exception):
    """The model called the browser wrongly: the message is what it reads."""


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)
    targets: dict[int, int] = field(default_factory=dict)  # link id -> the line it opens at (find results)
    results: bool = False  # a search or find results page


@dataclass(frozen=True)
class Citation:
    """A `【cursor†Lfirst-Llast】` of the model's text: where it is (start, end character offsets) and
    what it cites (the page's URL and title, and the cited lines' text)."""

    start: int
    end: int
    cursor: int
    first: int
    last: int
    url: str
    title: str
    text: str


def wrap(text: str, width: int) -> list[str]:
    lines = []
    for line in text.split("\n"):
        lines += textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False) or [""]
    return lines


def _int(args: dict, key: str, default: int) -> int:
    v = args.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise UsageError(f"`{key}` must be an integer, got {v!r}.")
    return v


def parse_call(call: ToolCall) -> tuple[str, dict]:
    """(function, arguments) of a browser call; UsageError when they are not valid."""
    fn = call.recipient.split(".", 1)[1] if "." in call.recipient else ""
    if fn not in FUNCTIONS:
        raise UsageError(f"Unknown browser function `{call.recipient}`: use browser.search, browser.open or "
                         f"browser.find.")
    text = call.arguments.strip()
    try:
        args = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise UsageError(f"The arguments of {call.recipient} are not valid JSON ({e}).") from e
    if not isinstance(args, dict):
        raise UsageError(f"The arguments of {call.recipient} must be a JSON object.")
    return fn, args


class BrowserTool(Tool):
    """The `browser` namespace over `backend`.

    view_tokens: a window's size in tokens when the call gives no num_lines; line_width: columns."""

    name = "browser"

    def __init__(self, backend: Backend, *, view_tokens: int = DEFAULT_VIEW_TOKENS, line_width: int = LINE_WIDTH):
        if view_tokens < 16 or line_width < 20:
            raise ValueError(f"view_tokens must be >= 16 and line_width >= 20, got {view_tokens}, {line_width}")
        self.backend, self.view_tokens, self.line_width = backend, view_tokens, line_width

    def namespace_config(self) -> oh.ToolNamespaceConfig:
        # harmony's browser namespace (the functions and wording the model was trained on), our source
        cfg = oh.ToolNamespaceConfig.browser()
        desc = re.sub(r"sources=.*$", f"sources={self.backend.source}", cfg.description)
        return oh.ToolNamespaceConfig(name=self.name, description=desc, tools=cfg.tools)

    def open_session(self) -> "BrowserSession":
        return BrowserSession(self)

    def preview(self, call: ToolCall, session: "BrowserSession | None") -> dict | None:
        try:
            fn, args = parse_call(call)
            if fn == "search":
                return {"type": "search", "query": str(args.get("query", ""))}
            page = session.page(_int(args, "cursor", -1)) if session is not None and session.pages else None
            if fn == "find":
                return {"type": "find_in_page", "pattern": str(args.get("pattern", "")),
                        "url": page.url if page else ""}
            target = args.get("id", -1)
            if isinstance(target, str):
                return {"type": "open_page", "url": target}
            return {"type": "open_page", "url": page.links.get(int(target), page.url) if page else None}
        except (UsageError, ValueError, TypeError):
            return None


class BrowserSession(ToolSession):
    """One conversation's browsing: its pages by cursor, and the pages fetched by URL."""

    def __init__(self, tool: BrowserTool):
        self.tool = tool
        self.pages: list[Page] = []
        self._cache: dict[str, Page] = {}

    # ---- the calls ------------------------------------------------------------------------------------
    def run(self, call: ToolCall) -> ToolResult:
        try:
            fn, args = parse_call(call)
            if len(self.pages) >= MAX_HISTORY:
                raise UsageError(f"The browsing history of this conversation is full ({MAX_HISTORY} pages).")
            if fn == "search":
                text, action = self.search(str(args.get("query", "")), _int(args, "topn", DEFAULT_TOPN))
            elif fn == "open":
                text, action = self.open(args.get("id", -1), _int(args, "cursor", -1), _int(args, "loc", -1),
                                         _int(args, "num_lines", -1), bool(args.get("view_source", False)))
            else:
                text, action = self.find(str(args.get("pattern", "")), _int(args, "cursor", -1))
        except (UsageError, BackendError) as e:
            return answer(call.recipient, str(e), call, failed=True, action=self.tool.preview(call, self))
        return answer(call.recipient, text, call, action=action)

    def search(self, query: str, topn: int) -> tuple[str, dict]:
        if not query.strip():
            raise UsageError("`query` is empty.")
        hits = self.tool.backend.search(query, min(max(topn, 1), MAX_TOPN))
        lines, links = [f"# Search results for `{query}`", ""], {}
        for i, h in enumerate(hits):
            where = urlparse(h.url).netloc or h.url
            lines.append(f"* 【{i}†{h.title}†{where}】 {h.snippet}")
            links[i] = h.url
        if not hits:
            lines.append(f"No results for `{query}`.")
        page = Page(f"search?q={quote(query)}", f"Search results for `{query}`",
                    wrap("\n".join(lines), self.tool.line_width), links, results=True)
        action = {"type": "search", "query": query, "sources": [{"type": "url", "url": h.url} for h in hits]}
        return self._show(page, 0, -1), action

    def open(self, target, cursor: int, loc: int, num_lines: int, view_source: bool) -> tuple[str, dict]:
        if view_source:
            raise UsageError("`view_source` is not available: open the page without it.")
        line = None
        if isinstance(target, str):  # a URL
            page = self._fetch(target)
        else:
            current = self.page(cursor)
            if isinstance(target, float) and target.is_integer():
                target = int(target)
            if not isinstance(target, int) or isinstance(target, bool):
                raise UsageError(f"`id` must be a link id (an integer) or a URL (a string), got {target!r}.")
            if target < 0:  # scroll the page at `cursor`
                page = current
            elif target not in current.links:
                raise UsageError(f"Invalid link id `{target}` on page [{cursor if cursor >= 0 else len(self.pages) - 1}]"
                                 f": its links are 0 - {max(current.links, default=-1)}.")
            else:
                page = self._fetch(current.links[target])
                line = current.targets.get(target)
        if loc < 0:
            loc = max(line - OPEN_ABOVE_TARGET, 0) if line is not None else 0
        return self._show(page, loc, num_lines), {"type": "open_page", "url": page.url}

    def find(self, pattern: str, cursor: int) -> tuple[str, dict]:
        page = self.page(cursor)
        if page.results:
            raise UsageError("Cannot run `find` on a search or find results page: open a page first.")
        if not pattern:
            raise UsageError("`pattern` is empty.")
        needle, lines, links, targets = pattern.lower(), [], {}, {}
        i = 0
        while i < len(page.lines) and len(links) < MAX_FIND_RESULTS:
            if needle not in page.lines[i].lower():
                i += 1
                continue
            k = len(links)
            lines += [f"# 【{k}†match at L{i}】", *page.lines[i:i + FIND_CONTEXT_LINES], ""]
            links[k], targets[k] = page.url, i
            i += FIND_CONTEXT_LINES
        if not links:
            lines = [f"No `find` results for pattern: `{pattern}`"]
        results = Page(f"{page.url}#find={quote(pattern)}", f"Find results for text: `{pattern}` in `{page.title}`",
                       lines, links, targets, results=True)
        return self._show(results, 0, -1), {"type": "find_in_page", "pattern": pattern, "url": page.url}

    # ---- pages ----------------------------------------------------------------------------------------
    def page(self, cursor: int = -1) -> Page:
        if not self.pages:
            raise UsageError("No pages to access: search or open a URL first.")
        if cursor == -1:
            return self.pages[-1]
        if not 0 <= cursor < len(self.pages):
            raise UsageError(f"Cursor `{cursor}` is out of range: the cursors are 0 - {len(self.pages) - 1}.")
        return self.pages[cursor]

    def _fetch(self, url: str) -> Page:
        page = self._cache.get(url)
        if page is None:
            doc: Document = self.tool.backend.fetch(url)
            page = Page(doc.url, doc.title or doc.url, wrap(doc.text, self.tool.line_width), dict(doc.links))
            self._cache[url] = self._cache[doc.url] = page
        return page

    def _show(self, page: Page, loc: int, num_lines: int) -> str:
        """Push `page` (a new cursor) and render the window that starts at line `loc`."""
        total = len(page.lines)
        if loc >= total:
            raise UsageError(f"Invalid location `{loc}`: the page's last line is {total - 1}.")
        end = min(loc + num_lines, total) if num_lines > 0 else self._window_end(page.lines, loc)
        self.pages.append(page)
        cursor = len(self.pages) - 1
        body = "\n".join(f"L{i}: {page.lines[i]}" for i in range(loc, end))
        where = f" ({page.url})" if page.url and not page.results else ""
        return f"[{cursor}] {page.title}{where}\n**viewing lines [{loc} - {end - 1}] of {total - 1}**\n\n{body}"

    def _window_end(self, lines: list[str], loc: int) -> int:
        """The end of a window from `loc` that holds about `view_tokens` tokens (at least one line)."""
        enc, used, end = load_tokenizer(), 0, loc
        while end < len(lines):
            used += len(enc.encode(f"L{end}: {lines[end]}\n", disallowed_special=()))
            if used > self.tool.view_tokens and end > loc:
                break
            end += 1
        return end

    # ---- citations ------------------------------------------------------------------------------------
    def citations(self, text: str) -> list[Citation]:
        """The `【cursor†Lstart(-Lend)?】` citations of `text` that name a shown page and its lines."""
        out = []
        for m in CITATION.finditer(text):
            cursor, first = int(m.group(1)), int(m.group(2))
            last = int(m.group(3)) if m.group(3) else first
            if cursor >= len(self.pages):
                continue
            page = self.pages[cursor]
            if not 0 <= first <= last < len(page.lines):
                continue
            out.append(Citation(m.start(), m.end(), cursor, first, last, page.url, page.title,
                                "\n".join(page.lines[first:last + 1])))
        return out
