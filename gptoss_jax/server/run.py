"""`gptoss-jax serve`: load, compile, listen (one line per stage on stderr)."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time

from ..engine import Engine, SamplingParams
from ..tokenizer import VOCAB_SIZE
from ..tools import Toolbox
from .app import DEFAULT_MAX_WAITING, ServerConfig, create_app
from .protocol import MAX_TOP_LOGPROBS_CHAT

API_KEY_ENV = "GPTOSS_API_KEY"
MAX_PORT = 65535


def served_name(model: str) -> str:
    """The name clients use: a Hub id as given, a folder by its base name."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def warm_up(engine: Engine) -> None:
    """Compile the decode step and the smallest prefill bucket (longer prompts compile their
    bucket on first use) before the server says it is healthy; with the harmony vocabulary also
    constrained decoding's (its tokenizer, ~1 s to build, and its two decode programs)."""
    params = [SamplingParams(max_tokens=2, temperature=0.0, stop_token_ids=())]
    if engine.model.config.vocab_size >= VOCAB_SIZE:
        params.append(SamplingParams(max_tokens=16, temperature=0.0, regex="[a-z]{1,2}", max_reasoning_tokens=0))
    for i, p in enumerate(params):  # one at a time: each decode path runs
        engine.add_request([0], p, request_id=f"warm-up-{i}")
        while engine.has_unfinished_requests():
            engine.step()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one), bound before uvicorn starts so the port is known."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(model: str, *, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_seqs: int = 16, max_len: int = 8192, prefill_chunk: int = 512, mesh: str | None = None,
          kernels: str = "auto", dtype: str = "auto", api_key: str | None = None,
          max_waiting: int = DEFAULT_MAX_WAITING, toolbox: Toolbox | None = None,
          kv_cache_gb: float | None = None) -> None:
    """Serve until interrupted. `toolbox`: the built-in tools Responses requests may use (the caller
    closes it; the server closes its sessions when it stops). `kv_cache_gb`: the engine's paged KV
    cache per device (None: every slot can reach `max_len`)."""
    import uvicorn

    from ..api import load_model

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for name, v, least in (("--max-seqs", max_seqs, 1), ("--max-len", max_len, 1),
                           ("--prefill-chunk", prefill_chunk, 1), ("--max-waiting", max_waiting, 0)):
        if v < least:  # checked before a long load or download
            raise ValueError(f"{name} must be >= {least}, got {v}")
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"--port must be in [0, {MAX_PORT}], got {port}")
    if kv_cache_gb is not None and not (math.isfinite(kv_cache_gb) and kv_cache_gb > 0):
        raise ValueError(f"--kv-cache-gb must be a positive number of GB, got {kv_cache_gb}")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind(host, port)  # a taken port fails now, not after a long load
    mesh_obj = None
    if mesh:
        from ..sharding import make_mesh, parse_mesh
        mesh_obj = make_mesh(**parse_mesh(mesh))
    t = time.perf_counter()
    say(f"loading {model} ...")
    m = load_model(model, dtype=dtype, mesh=mesh_obj, kernels=kernels, progress=False)
    if max_len > m.config.max_position_embeddings:
        raise ValueError(f"--max-len {max_len} exceeds the model's context of {m.config.max_position_embeddings}")
    engine = Engine(m, max_seqs=max_seqs, max_len=max_len, prefill_chunk=prefill_chunk,
                    top_logprobs=MAX_TOP_LOGPROBS_CHAT,
                    kv_cache_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 1e9))
    kv = f", KV cache {engine.kv.tokens_per_device()} tokens per device" if engine.pages is not None else ""
    say(f"compiling (max_seqs={max_seqs}, max_len={max_len}, kernels={m.kernels}{kv}) ...")
    warm_up(engine)
    app = create_app(engine, ServerConfig(served_model_name or served_name(model), api_key=api_key,
                                          max_waiting=max_waiting), toolbox)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gptoss_jax.server").setLevel(logging.INFO)
    h, p = sock.getsockname()[:2]
    tools = f", tools {', '.join(toolbox.names)}" if toolbox is not None else ""
    say(f"listening on http://{h}:{p} (model {app.state.gptoss.cfg.model_name!r}, ready in "
        f"{time.perf_counter() - t:.1f} s{', API key required' if api_key else ''}{tools})")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
