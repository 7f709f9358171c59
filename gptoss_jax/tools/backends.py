"""Where the browser tool's pages come from: a `Backend` searches and fetches.

* `LocalBackend(folder)`: the text, markdown and HTML files under a folder, searched with BM25
  (`bm25s`), offline. Its URLs are the files' paths relative to the folder (`guide/intro.md`).
* `HttpBackend`: the web. `fetch` reads a URL with httpx (http and https only; by default never a
  private, loopback or link-local address, so the model cannot reach this host's or its network's
  services); `search` calls the Brave Search API (`GET /res/v1/web/search`, header
  `X-Subscription-Token`, results in `web.results[]`), written against its documentation and not
  tested against the real service here.

HTML becomes text with BeautifulSoup (the standard library's HTML parser): scripts and styles
dropped, block elements on their own lines, links replaced by `【id†text】` markers whose ids the
browser opens.
"""

from __future__ import annotations

import abc
import importlib.util
import ipaddress
import os
import posixpath
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
DEFAULT_MAX_FILE_BYTES = 4 << 20  # a local file larger than this is left out of the index
DEFAULT_MAX_FETCH_BYTES = 4 << 20  # a web page is read up to this size
DEFAULT_FETCH_TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
SNIPPET_CHARS = 200
BRAVE_SEARCH_URL = "https://api.search.brave.com/res/v1/web/search"
BRAVE_MAX_COUNT = 20  # the API's largest `count`
SEARCH_API_KEY_ENV = "BRAVE_SEARCH_API_KEY"

# The markers the browser writes must not be forged by a page: its own brackets become look-alikes.
_MARKER_CHARS = str.maketrans({"【": "〖", "】": "〗"})
# block elements: a paragraph (a blank line around it) or a line of its own
_PARAGRAPH_TAGS = frozenset("article aside blockquote details dl figure footer form h1 h2 h3 h4 h5 h6 header hr "
                            "main nav ol p pre section table ul".split())
_LINE_TAGS = frozenset("address caption dd dialog div dt fieldset figcaption li summary tr".split())
_PARA, _PRE_NL = "\x00", "\x01"  # a paragraph break, and a line break inside <pre>, while the text is built
_DROP_TAGS = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "head")


class BackendError(Exception):
    """A search or fetch that failed: the message is what the model reads."""


@dataclass
class Document:
    """A page as text: `text` has `【id†text】` link markers whose targets are `links[id]`."""

    url: str
    title: str
    text: str
    links: dict[int, str] = field(default_factory=dict)


@dataclass
class SearchHit:
    url: str
    title: str
    snippet: str


class Backend(abc.ABC):
    """A source of pages. `source` names it in the tool description (`sources=...`)."""

    source: str

    @abc.abstractmethod
    def search(self, query: str, topn: int) -> list[SearchHit]:
        """The best `topn` hits for `query`, best first (BackendError when the search fails)."""

    @abc.abstractmethod
    def fetch(self, url: str) -> Document:
        """The page at `url` (BackendError when there is none or it cannot be read)."""


# ---- HTML -> text ------------------------------------------------------------------------------------
def html_to_text(html: str, url: str = "", resolve=None) -> Document:
    """HTML -> a Document. `resolve(href, url)` maps a link to the URL it opens (None: drop the link);
    by default links are made absolute against `url`."""
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, ProcessingInstruction

    soup = BeautifulSoup(html, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    for s in soup.find_all(string=True):
        if isinstance(s, (Comment, Declaration, Doctype, ProcessingInstruction)):
            s.extract()
        else:  # the page cannot forge link markers; source line breaks are spaces, except in <pre>
            t = str(s).translate(_MARKER_CHARS)
            s.replace_with(t.replace("\n", _PRE_NL) if s.find_parent("pre") is not None else re.sub(r"\s+", " ", t))
    resolve = resolve or (lambda href, base: urljoin(base, href))
    links: dict[int, str] = {}
    ids: dict[str, int] = {}
    host = urlparse(url).netloc
    for a in soup.find_all("a", href=True):
        text = a.get_text(" ", strip=True).replace("†", "‡")
        href = a["href"].strip()
        target = None if not text or href.startswith(("#", "javascript:", "mailto:")) else resolve(href, url)
        if target is None:
            a.replace_with(text)
            continue
        i = ids.setdefault(target, len(ids))
        links[i] = target
        other = urlparse(target).netloc
        a.replace_with(f"【{i}†{text}†{other}】" if other and other != host else f"【{i}†{text}】")
    for img in soup.find_all("img"):
        alt = img.get("alt", "").strip()
        img.replace_with(f"[Image: {alt}]" if alt else "")
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for tag in soup.find_all(_PARAGRAPH_TAGS | _LINE_TAGS | {"td", "th"}):
        if tag.name in ("td", "th"):  # a table row on one line
            tag.append(" ")
            continue
        if tag.name in ("h1", "h2", "h3", "h4", "h5", "h6"):
            tag.insert(0, "#" * int(tag.name[1]) + " ")
        elif tag.name == "li":
            tag.insert(0, "* ")
        brk = _PARA if tag.name in _PARAGRAPH_TAGS else "\n"
        tag.insert_before(brk)
        tag.insert_after(brk)
    # a run of breaks is a blank line if it holds a paragraph break, else one line break
    text = re.sub(r"[ \t]*[\n\x00][\s\x00]*", lambda m: "\n\n" if _PARA in m.group() else "\n", soup.get_text())
    return Document(url, " ".join(title.split()), text.replace(_PRE_NL, "\n").strip(), links)


def _title_of_text(text: str, fallback: str) -> str:
    """A text file's title: its first line when that is a markdown heading."""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first.lstrip("#").strip() or fallback if first.startswith("#") else fallback


# ---- a local folder -------------------------------------------------------------------------------------
class LocalBackend(Backend):
    """The text (.txt .md .rst) and HTML files under `folder`, indexed once (BM25 over title and text).
    A page is opened by its relative path, or by a link from another page of the folder."""

    def __init__(self, folder: str | os.PathLike, *, source: str | None = None,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"--browser-dir {folder!r} is not a folder")
        self.root = root
        self.source = source or f"local files ({root.name})"
        self.docs: dict[str, Document] = {}
        for path in sorted(root.rglob("*")):
            suffix = path.suffix.lower()
            if suffix not in TEXT_SUFFIXES + HTML_SUFFIXES or not path.is_file():
                continue
            real = path.resolve()
            if root not in real.parents or real.stat().st_size > max_file_bytes:
                continue  # a link out of the folder, or too large
            rel = real.relative_to(root).as_posix()
            raw = real.read_text(errors="replace")
            if suffix in HTML_SUFFIXES:
                doc = html_to_text(raw, rel, self._resolve)
                doc.title = doc.title or rel
            else:
                text = raw.translate(_MARKER_CHARS).rstrip()
                doc = Document(rel, _title_of_text(text, rel), text)
            self.docs[rel] = doc
        if not self.docs:
            raise ValueError(f"--browser-dir {folder!r} holds no text, markdown or HTML files")
        self._urls = list(self.docs)
        self._index = self._build_index()

    def _resolve(self, href: str, base: str) -> str | None:
        """A link of a local page: another file of the folder (by its relative path), or a web URL."""
        if urlparse(href).scheme in ("http", "https"):
            return href
        if urlparse(href).scheme:
            return None
        target = (self.root / base).parent / href.split("#", 1)[0]
        try:
            return target.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    @staticmethod
    def _tokenize(texts):
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def _build_index(self):
        import bm25s

        index = bm25s.BM25()
        index.index(self._tokenize([f"{d.title}\n{d.text}" for d in self.docs.values()]), show_progress=False)
        return index

    def search(self, query: str, topn: int) -> list[SearchHit]:
        tokens = self._tokenize([query])
        k = min(max(topn, 1), len(self._urls))
        # numpy top-k: bm25s would pick jax when it is installed, and run on the accelerator the model uses
        ids, scores = self._index.retrieve(tokens, k=k, show_progress=False, backend_selection="numpy")
        terms = [t for t in re.findall(r"\w\w+", query.lower())]
        hits = []
        for i, score in zip(ids[0], scores[0]):
            if score <= 0:
                break
            doc = self.docs[self._urls[int(i)]]
            hits.append(SearchHit(doc.url, doc.title, _snippet(doc.text, terms)))
        return hits

    def fetch(self, url: str) -> Document:
        rel = url.strip().split("#", 1)[0]
        if rel.startswith("file://"):  # also the file's own URL
            rel = rel[len("file://"):]
            rel = rel[len(self.root.as_posix()):] if rel.startswith(self.root.as_posix() + "/") else rel
        doc = self.docs.get(posixpath.normpath(rel).lstrip("/")) if rel else None
        if doc is None:
            raise BackendError(f"No page at `{url}` in {self.source}: open a search result, or a path such as "
                               f"`{self._urls[0]}`.")
        return doc


def _snippet(text: str, terms: list[str]) -> str:
    """The first line that has a query term (else the first line), cut to SNIPPET_CHARS."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    best = next((ln for ln in lines if any(t in ln.lower() for t in terms)), lines[0] if lines else "")
    return best if len(best) <= SNIPPET_CHARS else best[:SNIPPET_CHARS - 3] + "..."


# ---- the web --------------------------------------------------------------------------------------------
class HttpBackend(Backend):
    """Pages from the web (httpx) and search through the Brave Search API.

    search_api_key: the API key (default $BRAVE_SEARCH_API_KEY); without one, search answers that it
    is not configured and fetching URLs still works. allow_private: also fetch private, loopback and
    link-local addresses (off: the model could otherwise reach this host's and its network's services).
    """

    def __init__(self, *, search_api_key: str | None = None, search_url: str = BRAVE_SEARCH_URL,
                 allow_private: bool = False, timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
                 max_bytes: int = DEFAULT_MAX_FETCH_BYTES, source: str = "web"):
        if importlib.util.find_spec("httpx") is None:
            raise RuntimeError("the web browser backend needs httpx: pip install 'gptoss-jax[tools]'")
        self.search_api_key = search_api_key or os.environ.get(SEARCH_API_KEY_ENV) or None
        self.search_url, self.allow_private = search_url, allow_private
        self.timeout_s, self.max_bytes, self.source = timeout_s, max_bytes, source

    def _client(self):
        import httpx

        return httpx.Client(timeout=self.timeout_s, follow_redirects=False,
                            headers={"User-Agent": "gptoss-jax browser tool"})

    def search(self, query: str, topn: int) -> list[SearchHit]:
        import httpx

        if not self.search_api_key:
            raise BackendError(f"Web search is not configured on this server (no search API key: "
                               f"--search-api-key or ${SEARCH_API_KEY_ENV}); open a URL instead.")
        params = {"q": query, "count": min(max(topn, 1), BRAVE_MAX_COUNT)}
        headers = {"Accept": "application/json", "X-Subscription-Token": self.search_api_key}
        try:
            with self._client() as client:
                r = client.get(self.search_url, params=params, headers=headers)
        except httpx.HTTPError as e:
            raise BackendError(f"Error during search for `{query}`: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise BackendError(f"Error during search for `{query}`: the search API answered {r.status_code}")
        try:
            results = r.json().get("web", {}).get("results", [])
        except ValueError as e:
            raise BackendError(f"Error during search for `{query}`: the search API's answer is not JSON") from e
        hits = []
        for res in results[:topn]:
            if not isinstance(res, dict) or not res.get("url"):
                continue
            snippet = html_to_text(res.get("description", "")).text.replace("\n", " ")
            hits.append(SearchHit(res["url"], res.get("title") or res["url"], snippet[:SNIPPET_CHARS]))
        return hits

    def _check_url(self, url: str) -> None:
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise BackendError(f"Cannot open `{url}`: only http and https URLs can be opened.")
        if self.allow_private:
            return
        try:
            infos = socket.getaddrinfo(u.hostname, u.port or (443 if u.scheme == "https" else 80))
        except OSError as e:
            raise BackendError(f"Cannot open `{url}`: the host {u.hostname!r} does not resolve ({e}).") from e
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if not addr.is_global:
                raise BackendError(f"Cannot open `{url}`: it is a private or local address.")

    def fetch(self, url: str) -> Document:
        import httpx

        try:
            with self._client() as client:
                for _ in range(MAX_REDIRECTS + 1):
                    self._check_url(url)  # every hop: a redirect must not lead inside either
                    with client.stream("GET", url) as r:
                        if r.is_redirect and "location" in r.headers:
                            url = urljoin(url, r.headers["location"])
                            continue
                        if r.status_code != 200:
                            raise BackendError(f"Error fetching `{url}`: HTTP {r.status_code}.")
                        kind = r.headers.get("content-type", "text/html").split(";")[0].strip().lower()
                        if not (kind.startswith("text/") or kind in ("application/xhtml+xml", "application/xml")):
                            raise BackendError(f"Cannot show `{url}`: its content type is {kind}.")
                        body = bytearray()
                        for chunk in r.iter_bytes():
                            body += chunk
                            if len(body) >= self.max_bytes:
                                break
                        text = bytes(body[:self.max_bytes]).decode(r.encoding or "utf-8", errors="replace")
                    if kind in ("text/html", "application/xhtml+xml"):
                        doc = html_to_text(text, url)
                        doc.title = doc.title or urlparse(url).netloc
                        return doc
                    return Document(url, urlparse(url).netloc + urlparse(url).path, text.translate(_MARKER_CHARS))
                raise BackendError(f"Error fetching `{url}`: more than {MAX_REDIRECTS} redirects.")
        except httpx.HTTPError as e:
            raise BackendError(f"Error fetching `{url}`: {type(e).__name__}: {e}") from e
