"""The server under load: N concurrent streaming clients over HTTP against the same requests sent one at
a time, output tokens/s and time to first token (p50 / p99), as a ratio in one run.

    python benchmarks/bench_serve.py [--clients 16] [--requests 48] [--max-seqs 16] [--json]

A real uvicorn on 127.0.0.1 serves a small random gpt-oss (bench_engine's config with the real
o200k_harmony vocabulary); clients stream /v1/chat/completions with the official `openai` client, each
request greedy with a fixed max_tokens (a random model rarely stops, so every request runs to it; those
that stop early count what they produced). Compiles are excluded (one warm-up request per prompt
bucket). Measured on whatever JAX device is present: on CPU, label the figures as CPU figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import bench_config, pct  # noqa: E402

MODEL_NAME = "bench"


def start_server(engine):
    import uvicorn

    from gptoss_jax.server import ServerConfig, create_app
    from gptoss_jax.server.run import bind

    app = create_app(engine, ServerConfig(MODEL_NAME))
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def requests_mix(n: int, max_new: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    return [dict(messages=[{"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(4, 200))))}],
                 max_tokens=int(rng.integers(max_new // 4, max_new + 1))) for _ in range(n)]


def one(client, r):
    """Stream one request: (seconds to the first content, seconds total, output tokens)."""
    t = time.perf_counter()
    first, usage = None, None
    stream = client.chat.completions.create(model=MODEL_NAME, messages=r["messages"], max_tokens=r["max_tokens"],
                                            temperature=0, reasoning_effort="low", stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - t, time.perf_counter() - t, usage


def run(client, reqs, clients: int):
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda r: one(client, r), reqs))
    wall = time.perf_counter() - t
    tokens = sum(r[2] for r in res)
    ttft = [r[0] for r in res]
    return dict(clients=clients, output_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import jax
    import openai

    from gptoss_jax import Engine, load_model, write_random_checkpoint

    cfg = bench_config().replace(vocab_size=201088)  # harmony's special tokens are in the vocabulary
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    write_random_checkpoint(cfg, path, progress=False)
    model = load_model(path, dtype=args.dtype, kernels="auto", progress=False)
    engine = Engine(model, max_seqs=args.max_seqs, max_len=1024, prefill_chunk=256)
    server, thread, url = start_server(engine)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    reqs = requests_mix(args.requests, args.max_new)
    t = time.perf_counter()
    run(client, reqs[:args.clients], args.clients)  # warm-up: every prompt bucket and the decode step compile
    warm_s = time.perf_counter() - t
    try:
        concurrent_ = run(client, reqs, args.clients)
        alone = run(client, reqs, 1)
    finally:
        server.should_exit = True
        thread.join(30)
    dev = jax.devices()[0]
    label = "CPU figures" if dev.platform == "cpu" else dev.device_kind
    print(f"device: {dev.platform} ({label}); model: 4 layers, d=256, 16 experts top-4, vocab 201088, {args.dtype}; "
          f"{len(reqs)} chat requests, max_tokens {args.max_new // 4}..{args.max_new}, greedy, streamed over HTTP; "
          f"engine max_seqs {args.max_seqs}; warm-up {warm_s:.0f} s")
    print("| clients | output tok/s | TTFT p50 (s) | TTFT p99 (s) | wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in (concurrent_, alone):
        print(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | "
              f"{r['wall_s']:.1f} |")
    ratio = concurrent_["tokens_per_s"] / alone["tokens_per_s"]
    print(f"throughput ratio, {args.clients} concurrent clients / one at a time: {ratio:.2f}x ({label})")
    if args.json:
        print(json.dumps(dict(device=label, concurrent=concurrent_, one_at_a_time=alone, ratio=ratio)))


if __name__ == "__main__":
    main()
