"""Built-in tools without a model: the python tool on a real Jupyter kernel (one session shared by the
module, short timeouts), the browser over a local corpus and over HTTP on 127.0.0.1, the toolbox's
sessions, and the chat command's tool loop driven by scripted completions.

References: the corpus files themselves (lines, phrases), the kernel's own processes (psutil)."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.parse

import psutil
import pytest

from gptoss_jax.harmony import ToolCall, load_harmony_encoding
from gptoss_jax.tokenizer import CALL, load_tokenizer
from gptoss_jax.tools import BrowserTool, HttpBackend, LocalBackend, PythonTool, Toolbox, html_to_text, make_toolbox

TIMEOUT_S = 1.5  # the python tool's per-call timeout in these tests
GRACE_S = 1.5
LIMIT = 2000  # output characters the model reads
SECRET = "GPTOSS_TEST_SECRET"


def py(code: str) -> ToolCall:
    return ToolCall("python", code, "analysis", "code")


def kernels() -> set[int]:
    """The pids of this process's descendants (the kernels it started)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def python_tool():
    tool = PythonTool(timeout_s=TIMEOUT_S, interrupt_grace_s=GRACE_S, max_output_chars=LIMIT, memory_bytes=2 << 30)
    yield tool
    tool.close()


@pytest.fixture(scope="module")
def session(python_tool):
    """One kernel for the module, started while the server's environment holds secrets."""
    before = kernels()
    old = {k: os.environ.get(k) for k in (SECRET, "OPENAI_API_KEY")}
    os.environ.update({SECRET: "s3cret", "OPENAI_API_KEY": "sk-test"})
    try:
        s = python_tool.open_session()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert s.pid in kernels() - before
    yield s
    s.close()
    assert kernels() == before and not os.path.exists(s.root)  # no kernel left, the folder removed


# ---- python -------------------------------------------------------------------------------------------
def test_state_persists_and_errors_are_answers(session):
    assert session.run(py("x = 41")).output == "[no output]"
    r = session.run(py("x + 1"))
    assert r.output == "42\n" and not r.failed
    m = r.messages[0]
    assert (m.role, m.name, m.channel, m.recipient) == ("tool", "python", "analysis", "assistant")
    r = session.run(py("1 / 0"))
    assert "ZeroDivisionError: division by zero" in r.output and "\x1b[" not in r.output and not r.failed
    assert "SyntaxError" in session.run(py("def f(:")).output
    assert session.run(py("print(x)")).output == "41\n"


def test_a_runaway_loop_is_interrupted_within_the_timeout_and_the_session_goes_on(session):
    session.run(py("y = 'kept'"))
    t = time.monotonic()
    r = session.run(py("while True: pass"))
    took = time.monotonic() - t
    assert r.failed and "KeyboardInterrupt" in r.output and f"timed out after {TIMEOUT_S:g} s" in r.output
    assert TIMEOUT_S <= took < TIMEOUT_S + GRACE_S
    assert session.run(py("print(y)")).output == "kept\n"  # interrupted, not restarted: the state stays


def test_a_kernel_that_ignores_the_interrupt_is_restarted(session):
    pid = session.pid
    session.run(py("z = 1"))
    code = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass"
    t = time.monotonic()
    r = session.run(py(code))
    assert r.failed and "restarted" in r.output and time.monotonic() - t < TIMEOUT_S + GRACE_S + 30
    assert session.pid != pid and not psutil.pid_exists(pid)
    assert "NameError" in session.run(py("z")).output  # a fresh kernel
    assert session.run(py("print(1 + 1)")).output == "2\n"


def test_a_dead_kernel_is_restarted(session):
    pid = session.pid
    r = session.run(py("import os; os._exit(3)"))
    assert r.failed and "died (exit code 3)" in r.output
    assert session.pid != pid and session.run(py("print('back')")).output == "back\n"


def test_ten_megabytes_of_output_are_truncated_with_a_note(session):
    r = session.run(py("print('a' * 5_000_000 + 'b' * 5_000_000)"))
    assert len(r.output) < LIMIT + 100 and "characters of output truncated" in r.output
    assert r.output.startswith("a" * (LIMIT // 2)) and r.output.rstrip("\n").endswith("b" * 500)


def test_memory_limit_and_environment(session):
    assert "MemoryError" in session.run(py("blob = bytearray(4 << 30)")).output
    env = json.loads(session.run(py("import os, json; print(json.dumps(dict(os.environ)))")).output)
    assert SECRET not in env and "OPENAI_API_KEY" not in env
    assert env["HOME"] == os.path.join(session.root, "home") and env["TMPDIR"] == os.path.join(session.root, "tmp")
    assert session.run(py("import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])")).output == \
        f"{2 << 30}\n"


def test_files_stay_in_the_session_folder(session, python_tool):
    r = session.run(py("open('/mnt/data/notes.txt', 'w').write('hi'); import os; print(os.getcwd(), "
                       "sorted(os.listdir('/mnt/data')))"))
    assert r.output == "/mnt/data ['notes.txt']\n"  # the model sees its drive, not the host path
    assert open(os.path.join(session.data, "notes.txt")).read() == "hi"
    other = python_tool.open_session()
    try:
        assert other.run(py("import os; print(os.listdir('/mnt/data'))")).output == "[]\n"
        assert other.data != session.data
    finally:
        other.close()
    assert not os.path.exists(other.root)


def test_toolbox_sessions_close_when_idle_and_on_close(tmp_path):
    before = kernels()
    box = Toolbox([PythonTool(), BrowserTool(LocalBackend(corpus(tmp_path)))], idle_s=1.5)
    assert not box.run("b", call("search", query="cats")).failed
    assert box.run("a", py("print(7)")).output == "7\n"
    assert len(kernels() - before) == 1 and box.open_sessions() == 2
    deadline = time.monotonic() + 30
    while (box.open_sessions() or kernels() != before) and time.monotonic() < deadline:  # the reaper's work
        time.sleep(0.1)
    assert box.open_sessions() == 0 and kernels() == before
    unknown = box.run("a", ToolCall("container.exec", "{}", "analysis"))
    assert unknown.failed and "Unknown tool" in unknown.output
    box.close()
    assert kernels() == before
    with pytest.raises(ValueError, match="unknown tool"):
        make_toolbox(["shell"])
    with pytest.raises(ValueError, match="--browser-dir needs --tool browser"):
        make_toolbox(["python"], browser_dir=str(tmp_path))


# ---- browser ------------------------------------------------------------------------------------------
DOCS = {
    "cats.txt": "Cats are small carnivorous mammals.\nThe domestic cat sleeps most of the day.\n"
                "A purring cat is usually content.\nCats have retractable claws.\n",
    "guide/jax.md": "# JAX\n\nJAX is a Python library for array computation.\nIt compiles programs with XLA.\n"
                    "Transformations: grad, jit and vmap.\n",
    "travel/paris.html": "<html><head><title>Paris guide</title><script>var x = 1;</script></head><body>"
                         "<h1>Paris</h1><p>Paris is the capital of France.</p>"
                         "<p>The Eiffel Tower was completed in 1889.</p>"
                         "<p>See <a href='../guide/jax.md'>the JAX page</a> or "
                         "<a href='https://example.org/paris'>more</a>.</p></body></html>",
}


def corpus(root) -> str:
    folder = os.path.join(root, "corpus")
    for name, text in DOCS.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def call(fn: str, **args) -> ToolCall:
    return ToolCall(f"browser.{fn}", json.dumps(args), "analysis", "code")


def shown_lines(output: str) -> dict[int, str]:
    """The `L{i}: text` lines of a browser display."""
    return {int(ln[1:ln.index(":")]): ln[ln.index(":") + 2:] for ln in output.splitlines()
            if ln.startswith("L") and ":" in ln and ln[1:ln.index(":")].isdigit()}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    return BrowserTool(LocalBackend(corpus(tmp_path_factory.mktemp("browse"))))


def test_search_ranks_the_known_document_first(browser):
    s = browser.open_session()
    r = s.run(call("search", query="When was the Eiffel Tower completed?"))
    assert not r.failed and r.output.startswith("[0] Search results")
    assert r.action["sources"][0]["url"] == "travel/paris.html"
    assert "【0†Paris guide†travel/paris.html】" in r.output
    assert s.run(call("search", query="carnivorous claws")).action["sources"][0]["url"] == "cats.txt"
    assert s.run(call("search", query="XLA compiles")).action["sources"][0]["url"] == "guide/jax.md"
    assert "No results" in s.run(call("search", query="zyzzyva")).output


def test_open_shows_numbered_lines_find_locates_and_citations_map_back(browser):
    s = browser.open_session()
    r = s.run(call("open", id="cats.txt"))
    file_lines = DOCS["cats.txt"].rstrip("\n").split("\n")
    assert r.output.splitlines()[:2] == ["[0] cats.txt (cats.txt)", f"**viewing lines [0 - {len(file_lines) - 1}] of "
                                                                     f"{len(file_lines) - 1}**"]
    assert shown_lines(r.output) == dict(enumerate(file_lines))
    # find: the phrase's line in the file
    r = s.run(call("find", pattern="PURRING cat"))
    want = next(i for i, ln in enumerate(file_lines) if "purring cat" in ln.lower())
    assert r.output.startswith("[1] Find results") and f"【0†match at L{want}】" in r.output
    r = s.run(call("open", id=0))  # follow the match: the page again, from above the line
    assert r.output.startswith("[2] cats.txt") and want in shown_lines(r.output)
    # scrolling: a window of the page at cursor 0
    r = s.run(call("open", cursor=0, loc=1, num_lines=2))
    assert shown_lines(r.output) == {1: file_lines[1], 2: file_lines[2]} and "[1 - 2] of 3" in r.output
    # citations name the cursor and lines shown there
    text = "Cats sleep a lot 【0†L1】 and purr 【3†L2-L3】; not 【9†L1】 nor 【0†L99】."
    cites = s.citations(text)
    assert [(c.cursor, c.first, c.last, c.url) for c in cites] == [(0, 1, 1, "cats.txt"), (3, 2, 3, "cats.txt")]
    assert cites[1].text == "\n".join(file_lines[2:4]) and text[cites[0].start:cites[0].end] == "【0†L1】"


def test_links_errors_and_html(browser):
    s = browser.open_session()
    r = s.run(call("open", id="travel/paris.html"))
    lines = list(shown_lines(r.output).values())
    assert "# Paris" in lines and "The Eiffel Tower was completed in 1889." in lines
    assert not any("var x" in ln for ln in lines)  # scripts are not text
    assert "【0†the JAX page】" in r.output and "【1†more†example.org】" in r.output
    assert s.run(call("open", id=0)).output.startswith("[1] JAX (guide/jax.md)")  # a local link
    for bad, said in [(call("open", id="nope.md"), "No page at `nope.md`"), (call("open", id=7), "Invalid link id"),
                      (call("open", cursor=42), "out of range"),
                      (ToolCall("browser.open", "{not json", "analysis"), "not valid JSON"),
                      (ToolCall("browser.fly", "{}", "analysis"), "Unknown browser function")]:
        r = s.run(bad)
        assert r.failed and said in r.output, r.output
    assert s.run(call("search", query="cats")).output.startswith("[")
    assert "Cannot run `find` on a search" in s.run(call("find", pattern="cat")).output
    doc = html_to_text("<p>a 【9†forged】 b<br>c</p><pre>x\n  y</pre><!-- hidden -->", "https://h.org/")
    assert doc.text == "a 〖9†forged〗 b\nc\n\nx\n  y"


class _Web(http.server.BaseHTTPRequestHandler):
    """127.0.0.1 only: a page, a redirect, a binary file, and a search API in Brave's documented shape."""

    seen: list = []

    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        _Web.seen.append((u.path, urllib.parse.parse_qs(u.query), self.headers.get("X-Subscription-Token")))
        if u.path == "/page":
            body, kind = b"<html><title>Local page</title><body><p>Hello from the web.</p></body></html>", "text/html"
        elif u.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/page")
            self.end_headers()
            return
        elif u.path == "/res/v1/web/search":
            results = [{"title": "Result one", "url": "https://one.example/a", "description": "the <strong>first</strong>"}]
            body, kind = json.dumps({"web": {"results": results}}).encode(), "application/json"
        else:
            body, kind = b"\x00\x01", "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(10)


def test_http_backend_on_loopback(web):
    guarded = BrowserTool(HttpBackend()).open_session()
    r = guarded.run(call("open", id=f"{web}/page"))
    assert r.failed and "private or local address" in r.output  # the default: never this host's services
    assert "only http and https" in guarded.run(call("open", id="file:///etc/passwd")).output
    assert "not configured" in guarded.run(call("search", query="x")).output

    tool = BrowserTool(HttpBackend(allow_private=True, search_api_key="k3y", search_url=f"{web}/res/v1/web/search"))
    s = tool.open_session()
    r = s.run(call("open", id=f"{web}/moved"))
    assert r.output.startswith("[0] Local page") and "Hello from the web." in r.output
    assert "content type is application/octet-stream" in s.run(call("open", id=f"{web}/blob")).output
    r = s.run(call("search", query="first thing", topn=3))
    assert "【0†Result one†one.example】 the first" in r.output
    assert _Web.seen[-1] == ("/res/v1/web/search", {"q": ["first thing"], "count": ["3"]}, "k3y")


# ---- the chat command's loop --------------------------------------------------------------------------
def harmony(text: str) -> list[int]:
    return load_tokenizer().encode(text, allowed_special="all")


def test_chat_tool_turn_runs_calls_and_continues():
    from gptoss_jax.cli import _Reply, tool_turn
    from gptoss_jax.harmony import CompletionDecoder, render_continuation

    scripts = [harmony("<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>"),
               harmony("<|channel|>final<|message|>It is 42.<|return|>")]
    prompts = []

    def generate(prompt, max_tokens):
        prompts.append(list(prompt))
        toks = scripts.pop(0)
        d = CompletionDecoder()
        content = "".join(x.text for t in toks for x in d.feed(t) if x.kind == "content")
        return _Reply(content, toks, list(d.tool_calls))

    seen = []
    with Toolbox([PythonTool()]) as box:
        answer = tool_turn(generate, [1, 2, 3], 100, box, report=lambda c, r: seen.append((c.recipient, r.output)))
    assert answer == "It is 42." and seen == [("python", "42\n")]
    first = harmony("<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>")
    assert first[-1] == CALL
    tool_msg = {"role": "tool", "name": "python", "content": "42\n", "channel": "analysis", "recipient": "assistant"}
    assert prompts[1] == [1, 2, 3, *first, *render_continuation([tool_msg])]
    assert load_harmony_encoding().decode(render_continuation([tool_msg])) == \
        "<|start|>python to=assistant<|channel|>analysis<|message|>42\n<|end|><|start|>assistant"


@pytest.mark.parametrize("argv, match", [
    (["serve", "--tool", "browser", "--browser-dir", "/nonexistent/folder"], "is not a folder"),
    (["chat", "--browser-dir", "."], "--browser-dir needs --tool browser"),
    (["generate", "--prompt", "x", "--raw", "--tool", "python"], "drop --raw"),
    (["serve", "--tool", "python", "--max-tool-calls", "0"], "--max-tool-calls must be >= 1"),
    (["serve", "--tool", "python", "--python-memory", "-1"], "--python-memory must be >= 0"),
])
def test_tool_options_are_one_line_errors_before_the_model_loads(capsys, argv, match):
    from gptoss_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--model", "/nonexistent/model"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err and "loading" not in err
