"""Serving engine vs one request at a time: output tokens/s, time to first token, inter-token latency,
slot occupancy, for a fixed random mix of requests arriving at once and as a Poisson stream; and the
paged KV cache: sequences held at a fixed KV budget (paged vs contiguous slot rows) and time to first
token for a repeated 2k-token prefix with and without the prefix cache.

    python benchmarks/bench_engine.py [--requests 64] [--max-seqs 16] [--prefill-chunk 512]
                                      [--sections throughput,capacity,prefix] [--json]
    python benchmarks/bench_engine.py --structured [--requests 32] [--max-seqs 16] [--json]

The mix: prompt lengths uniform in 16..1024, max_tokens uniform in 16..256 (seed 0), sampling settings
mixed (greedy, temperature 0.7 / top-p 0.9, temperature 1.0), no stop token (a random checkpoint: every
request runs to max_tokens). The baseline runs `generate()` on each request alone, in arrival order
(a single server: its TTFT includes waiting for the requests before it, and generate() returns all
tokens at once, so its first token arrives when the call returns). The Poisson stream arrives at
`--load` times the engine's burst throughput (requests/s); the baseline replays the same arrivals on
its measured durations. Compiles are excluded (warm-up on every shape). Measured on whatever JAX
device is present: on CPU, label the figures as CPU figures.

Capacity: a server's context limit (`--capacity-max-len`, 8192) is far above most requests' lengths.
A KV budget of `--kv-slots` contiguous rows of that length: the slot engine holds that many sequences
whatever their lengths, the paged engine (8x the slots, the same bytes in pages of 128, rings included)
as many as their real lengths fit, preempting when they outgrow the pool. Both serve
`--capacity-requests` of the same mix at once; reported: mean sequences decoding together, peak
sequences in slots, tokens/s, preemptions.
Prefix: requests of one 2048-token prefix + 32 own tokens, one at a time, max_tokens 1 (the time to
first token is the prefill); the prefix cache prefills only the 32 (+ up to a page) after the first.

`--structured`: constrained decoding's cost. The same burst of requests (a harmony prompt, max_tokens
96, temperature 1.0) with 0%, 50% and 100% of them constrained by a JSON schema (reasoning budget 64:
random weights reason until the budget closes the analysis, so constrained replies are about as long
as the unconstrained ones), on a model with the real o200k_harmony vocabulary (201,088: grammars need real
tokens). Reports the time of a step that decodes every slot (the throughput at equal occupancy, and its
ratio to 0%: goal under 10% loss at 100%), inter-token latency, the burst's output tokens/s and the
host time per mask (llguidance).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def bench_config():
    """A small gpt-oss (4 layers, d=256, 16 experts, vocab 32000): CPU-sized, the real layer mix."""
    from gptoss_jax.config import FULL, SLIDING, preset

    return preset("gpt-oss-20b").replace(
        hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, num_local_experts=16, num_experts_per_tok=4, sliding_window=128,
        layer_types=(SLIDING, FULL, SLIDING, FULL), vocab_size=32000, pad_token_id=None, eos_token_id=None)


SETTINGS = [dict(temperature=0.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.0)]


def request_mix(n: int, vocab: int, max_prompt: int, max_new: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        L = int(rng.integers(16, max_prompt + 1))
        m = int(rng.integers(16, max_new + 1))
        reqs.append(dict(prompt=rng.integers(0, vocab, L).astype(int).tolist(), max_tokens=m, seed=i,
                         **SETTINGS[i % len(SETTINGS)]))
    return reqs


def params_of(r):
    from gptoss_jax import SamplingParams

    return SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], top_p=r.get("top_p", 1.0),
                          seed=r["seed"], stop_token_ids=())


def pct(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else float("nan")


def serve(eng, requests, arrivals, tag: str, step_log: list | None = None):
    """Serve (prompt, params) pairs arriving at `arrivals` (seconds from the start): (per-token
    report times by request index, wall seconds, the engine's stats of this run). `step_log` gets
    (seconds, decode tokens, prefill tokens) per step."""
    order = np.argsort(arrivals, kind="stable")
    t0 = time.perf_counter()
    times = {i: [] for i in range(len(requests))}
    nxt, stats0 = 0, dict(eng.stats)
    while nxt < len(requests) or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < len(requests) and arrivals[order[nxt]] <= now:
            i = int(order[nxt])
            eng.add_request(*requests[i], request_id=f"{tag}{i}")
            nxt += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[order[nxt]] - now))
            continue
        before = (time.perf_counter(), eng.stats["decode_tokens"], eng.stats["prefill_tokens"])
        outs = eng.step()
        t = time.perf_counter() - t0
        if step_log is not None:
            step_log.append((time.perf_counter() - before[0], eng.stats["decode_tokens"] - before[1],
                             eng.stats["prefill_tokens"] - before[2]))
        for o in outs:
            times[int(o.request_id[len(tag):])] += [t] * len(o.new_token_ids)
    wall = time.perf_counter() - t0
    return times, wall, {k: eng.stats[k] - stats0.get(k, 0) for k in eng.stats}


def run_engine(eng, reqs, arrivals, tag: str):
    """Serve `reqs` arriving at `arrivals`; the figures of `summarize`."""
    times, wall, stats = serve(eng, [(r["prompt"], params_of(r)) for r in reqs], arrivals, tag)
    return summarize(reqs, arrivals, times, wall, occupancy=stats["decode_tokens"] / max(1, stats["decode_steps"])
                     / eng.max_seqs, steps=stats["steps"])


def summarize(reqs, arrivals, times, wall, **extra):
    tokens = sum(len(t) for t in times.values())
    assert tokens == sum(r["max_tokens"] for r in reqs), "every request runs to max_tokens"
    ttft = [times[i][0] - arrivals[i] for i in times]
    itl = [b - a for t in times.values() for a, b in zip(t, t[1:])]
    return dict(output_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall, ttft_p50=pct(ttft, 50),
                ttft_p99=pct(ttft, 99), itl_p50=pct(itl, 50), itl_p99=pct(itl, 99), **extra)


def run_one_at_a_time(model, reqs, chunk):
    """generate() per request, alone: (durations, all tokens)."""
    from gptoss_jax import generate

    durations, outs = [], []
    for r in reqs:
        t = time.perf_counter()
        g = generate(model, [r["prompt"]], max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                     top_p=r.get("top_p", 1.0), seed=r["seed"], stop_tokens=(), prefill_chunk=chunk)
        outs.append(g.tokens[0].tolist())
        durations.append(time.perf_counter() - t)
    return durations, outs


def replay_baseline(reqs, arrivals, durations):
    """A single FIFO server on the measured generate() durations; every token of a request arrives
    when its call returns (ITL: the call's decode time spread over its tokens)."""
    free, times = 0.0, {}
    for i in np.argsort(arrivals, kind="stable"):
        start = max(free, arrivals[i])
        free = start + durations[i]
        times[int(i)] = [free] * reqs[i]["max_tokens"]
    res = summarize(reqs, arrivals, times, free - min(arrivals))
    per_token = [durations[i] / reqs[i]["max_tokens"] for i in range(len(reqs))]
    res.update(itl_p50=pct(per_token, 50), itl_p99=pct(per_token, 99), occupancy=float("nan"), steps=0)
    return res


def warm_up(model, eng, reqs, chunk, baseline=True):
    """Every compiled shape once: the engine's prefill buckets / chunk variants and decode step, and
    generate()'s (prompt bucket, cache bucket, decode bucket) combinations of this mix."""
    from gptoss_jax.generate import MIN_BUCKET, next_pow2, decode_bucket

    lens = sorted({min(max(MIN_BUCKET, next_pow2(len(r["prompt"]))), chunk) for r in reqs}) + [chunk + 1, 2 * chunk + 1]
    for i, n in enumerate(n for n in lens if n + 2 <= eng.max_len):
        eng.add_request([1] * n, params_of(dict(max_tokens=2, temperature=0.7, top_p=0.9, seed=0)), request_id=f"w{i}")
    while eng.has_unfinished_requests():
        eng.step()
    if not baseline:
        return
    seen = set()
    cfg = model.config
    for r in reqs:
        L, m = len(r["prompt"]), r["max_tokens"]
        T = min(max(MIN_BUCKET, next_pow2(L)), chunk)
        key = (T, -(-L // T) > 1, min(max(next_pow2(L + decode_bucket(m)), 64), cfg.max_position_embeddings),
               decode_bucket(m))
        if key not in seen:  # the shortest max_tokens of the same decode bucket compiles the same
            seen.add(key)
            b = decode_bucket(m)
            run_one_at_a_time(model, [dict(r, max_tokens=1 if b == MIN_BUCKET else b // 2 + 1)], chunk)


def kv_row_bytes(model, max_len: int) -> int:
    """Bytes of one contiguous slot row (k and v, full layers max_len, sliding layers their window)."""
    cfg = model.config
    per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * np.dtype(model.dtype).itemsize
    return per_pos * sum(max_len if cfg.window(i) is None else min(cfg.window(i), max_len)
                         for i in range(cfg.num_hidden_layers))


def held(eng, reqs, tag):
    """Serve `reqs` all at once: mean sequences decoding together, peak sequences in slots, tokens/s,
    preemptions."""
    for i, r in enumerate(reqs):
        eng.add_request(r["prompt"], params_of(r), request_id=f"{tag}{i}")
    before, peak, t0 = dict(eng.stats), 0, time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.max_seqs - eng.num_free_slots())
    wall = time.perf_counter() - t0
    d = {k: eng.stats[k] - before.get(k, 0) for k in eng.stats}
    return dict(mean=d["decode_tokens"] / max(1, d["decode_steps"]), peak=peak, tokens_per_s=d["output_tokens"] / wall,
                preemptions=d.get("preemptions", 0), wall_s=wall)


PAGED_SLOTS = 8  # capacity: the paged engine's slots per contiguous row of the budget


def bench_capacity(model, args):
    """Sequences held at a fixed KV budget: `kv_slots` contiguous rows vs pages of the same bytes."""
    from gptoss_jax import Engine

    max_len = args.capacity_max_len
    budget = args.kv_slots * kv_row_bytes(model, max_len)
    reqs = request_mix(args.capacity_requests, model.config.vocab_size, args.max_prompt, args.max_new, seed=2)
    common = dict(max_len=max_len, prefill_chunk=args.prefill_chunk)
    engines = {"slot rows": Engine(model, max_seqs=args.kv_slots, paged=False, **common),
               "paged": Engine(model, max_seqs=PAGED_SLOTS * args.kv_slots, kv_cache_bytes=budget, **common)}
    out = {}
    for name, eng in engines.items():
        warm_up(model, eng, reqs, args.prefill_chunk, baseline=False)
        out[name] = held(eng, reqs, f"cap-{name}-")
        print(f"capacity {name}: {out[name]}", flush=True)
    return dict(budget_bytes=budget, max_len=max_len, pages=engines["paged"].kv.layout.pages_per_shard, **out)


def bench_prefix(model, args):
    """TTFT of requests sharing a 2048-token prefix, one at a time, with and without the prefix cache."""
    from gptoss_jax import Engine

    V = model.config.vocab_size
    rng = np.random.default_rng(3)
    shared = rng.integers(0, V, 2048).tolist()
    reqs = [dict(prompt=shared + rng.integers(0, V, 32).tolist(), max_tokens=1, seed=0, temperature=0.0)
            for _ in range(2 + args.prefix_requests)]
    out = {}
    for name, caching in (("prefix cache", True), ("no prefix cache", False)):
        eng = Engine(model, max_seqs=2, max_len=2048 + 32 + 64, prefill_chunk=args.prefill_chunk,
                     prefix_caching=caching)
        ttft = []
        for i, r in enumerate(reqs):  # the first two fill the cache and compile the hit's programs
            t = time.perf_counter()
            eng.add_request(r["prompt"], params_of(r), request_id=f"pre{i}")
            while eng.has_unfinished_requests():
                eng.step()
            if i >= 2:
                ttft.append(time.perf_counter() - t)
        out[name] = dict(ttft_p50=pct(ttft, 50), prefill_tokens=eng.stats["prefill_tokens"],
                         prefix_hit_tokens=eng.stats["prefix_hit_tokens"])
        print(f"prefix {name}: {out[name]}", flush=True)
    return out


STRUCTURED_SCHEMA = {  # a realistic answer: nested object, array, enum, bounded numbers, strings
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            "high": {"type": "integer", "minimum": -60, "maximum": 60},
            "rain": {"type": "number", "minimum": 0, "maximum": 1},
            "summary": {"type": "string", "maxLength": 40}}, "required": ["day", "high"]}},
        "alert": {"type": "boolean"}}, "required": ["city", "days"]}


def structured_main(args):
    """0% / 50% / 100% constrained requests through one warm engine (see the module docstring)."""
    import jax

    from gptoss_jax import Engine, SamplingParams, load_model, write_random_checkpoint
    from gptoss_jax.harmony import ResponseFormat, render_prompt
    from gptoss_jax.tokenizer import VOCAB_SIZE

    cfg = bench_config().replace(vocab_size=VOCAB_SIZE)
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    write_random_checkpoint(cfg, path, progress=False)
    model = load_model(path, dtype=args.dtype, kernels="auto", progress=False)
    prompt = render_prompt([{"role": "user", "content": "What is the weather this week in Paris?"}],
                           reasoning_effort="low", response_format=ResponseFormat("forecast", STRUCTURED_SCHEMA))
    max_tokens, reasoning = 96, 64
    eng = Engine(model, max_seqs=args.max_seqs, max_len=len(prompt) + max_tokens, prefill_chunk=args.prefill_chunk)

    def params(i, constrained):
        kw = dict(json_schema=STRUCTURED_SCHEMA, max_reasoning_tokens=reasoning) if constrained else {}
        return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, **kw)

    def burst(frac, n, tag):
        k = round(frac * n)  # the constrained ones spread evenly through the queue
        requests = [(prompt, params(i, i * k // n != (i + 1) * k // n)) for i in range(n)]
        log = []
        times, wall, st = serve(eng, requests, np.zeros(n), tag, log)
        itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
        tokens = sum(len(ts) for ts in times.values())
        # steps that decode every slot and prefill nothing: the cost of a step at equal occupancy
        # (throughput = max_seqs / it), whatever the replies' lengths
        full = [dt for dt, dec, pre in log if dec == args.max_seqs and pre == 0]
        return dict(constrained=k, output_tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                    full_steps=len(full), full_step_ms=1e3 * float(np.mean(full)) if full else float("nan"),
                    itl_p50=pct(itl, 50), itl_p99=pct(itl, 99), masks=st.get("masks", 0),
                    mask_ms=1e3 * st.get("mask_seconds", 0.0) / max(1, st.get("masks", 0)),
                    mask_step_ms=1e3 * st.get("mask_seconds", 0.0) / max(1, st.get("constrained_steps", 0)))

    t = time.perf_counter()
    for frac in (0.0, 1.0):  # warm-up: both decode paths, the prefill bucket, the grammar's compile
        burst(frac, 2, f"w{frac}-")
    warm_s = time.perf_counter() - t
    results = {frac: burst(frac, args.requests, f"b{frac}-") for frac in (0.0, 0.5, 1.0)}
    dev = jax.devices()[0]
    label = "CPU figures" if dev.platform == "cpu" else f"{dev.device_kind}"
    print(f"device: {dev.platform} ({label}); model: 4 layers, d=256, 16 experts top-4, vocab {VOCAB_SIZE}, "
          f"{args.dtype}; {args.requests} requests at once, prompt {len(prompt)} tokens, max_tokens {max_tokens}, "
          f"temperature 1.0; engine max_seqs {args.max_seqs}; warm-up (compiles) {warm_s:.0f} s")
    print(f"{'constrained':<13}{'full step':>10}{'tok/s':>8}{'ratio':>8}{'ITL p50':>10}{'ITL p99':>10}"
          f"{'out tok/s':>10}{'masks':>7}{'host/mask':>11}{'host/step':>11}")
    base = results[0.0]
    for frac, r in results.items():
        full_tps = args.max_seqs / r["full_step_ms"] * 1e3
        ratio = base["full_step_ms"] / r["full_step_ms"]
        print(f"{frac:<13.0%}{r['full_step_ms']:>8.1f}ms{full_tps:>8.1f}{ratio:>7.2f}x{r['itl_p50'] * 1e3:>8.1f}ms"
              f"{r['itl_p99'] * 1e3:>8.1f}ms{r['tokens_per_s']:>10.1f}{r['masks']:>7}{r['mask_ms']:>9.2f}ms"
              f"{r['mask_step_ms']:>9.1f}ms")
    print("full step: the mean step that decodes every slot and prefills nothing; tok/s = max_seqs / it, the "
          "throughput at equal occupancy (ratio to 0%); out tok/s: the whole burst (constrained replies end "
          f"sooner, so it also measures the tail) ({label})")
    if args.json:
        print(json.dumps(dict(device=dev.platform, label=label, results={str(k): v for k, v in results.items()})))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=None, help="default 64 (--structured: 32)")
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode-steps", default="1,8", help="engine decode steps per dispatch, comma-separated runs")
    ap.add_argument("--load", type=float, default=0.8, help="Poisson rate as a fraction of the burst throughput")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sections", default="throughput,capacity,prefix")
    ap.add_argument("--kv-slots", type=int, default=4, help="capacity: the KV budget in contiguous max_len rows")
    ap.add_argument("--capacity-max-len", type=int, default=8192, help="capacity: the engines' max_len")
    ap.add_argument("--capacity-requests", type=int, default=32)
    ap.add_argument("--prefix-requests", type=int, default=5, help="prefix: measured requests (after 2 warm-up)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--structured", action="store_true", help="0%% / 50%% / 100%% constrained requests instead")
    args = ap.parse_args()
    if args.structured:
        args.requests = args.requests or 32
        return structured_main(args)
    args.requests = args.requests or 64
    sections = set(args.sections.split(","))
    import jax

    from gptoss_jax import load_model, write_random_checkpoint

    cfg = bench_config()
    path = os.path.join(tempfile.mkdtemp(), "ckpt")
    write_random_checkpoint(cfg, path, progress=False)
    model = load_model(path, dtype=args.dtype, kernels="auto", progress=False)
    dev = jax.devices()[0]
    label = "CPU figures" if dev.platform == "cpu" else f"{dev.device_kind}"
    report = dict(device=dev.platform, label=label)
    if "throughput" in sections:
        report.update(bench_throughput(model, args, label))
    if "capacity" in sections:
        c = report["capacity"] = bench_capacity(model, args)
        s, p = c["slot rows"], c["paged"]
        print(f"KV budget {c['budget_bytes'] / 2 ** 20:.1f} MiB = {args.kv_slots} rows of max_len {c['max_len']} "
              f"= {c['pages']} pages of 128 ({label})")
        print(f"{'cache':<12}{'slots':>6}{'mean held':>10}{'peak held':>10}{'out tok/s':>10}{'preempted':>10}")
        for name, r in (("slot rows", s), ("paged", p)):
            slots = args.kv_slots * (PAGED_SLOTS if name == "paged" else 1)
            print(f"{name:<12}{slots:>6}{r['mean']:>10.2f}{r['peak']:>10}{r['tokens_per_s']:>10.1f}{r['preemptions']:>10}")
        print(f"sequences held, paged / slot rows: {p['mean'] / s['mean']:.2f}x mean, {p['peak'] / s['peak']:.2f}x peak; "
              f"throughput {p['tokens_per_s'] / s['tokens_per_s']:.2f}x ({label})")
    if "prefix" in sections:
        x = report["prefix"] = bench_prefix(model, args)
        on, off = x["prefix cache"], x["no prefix cache"]
        print(f"TTFT, 2048-token shared prefix + 32: {on['ttft_p50'] * 1e3:.0f} ms with the prefix cache, "
              f"{off['ttft_p50'] * 1e3:.0f} ms without: {off['ttft_p50'] / on['ttft_p50']:.1f}x faster ({label})")
    if args.json:
        print(json.dumps(report, default=float))


def bench_throughput(model, args, label) -> dict:
    """The engine (decode_steps per --decode-steps) vs generate() one request at a time."""
    import jax

    from gptoss_jax import Engine

    cfg = model.config
    reqs = request_mix(args.requests, cfg.vocab_size, args.max_prompt, args.max_new)
    max_len = args.max_prompt + args.max_new
    ks = [int(k) for k in args.decode_steps.split(",")]
    engines = {k: Engine(model, max_seqs=args.max_seqs, max_len=max_len, prefill_chunk=args.prefill_chunk,
                         decode_steps=k) for k in ks}
    t = time.perf_counter()
    for i, eng in enumerate(engines.values()):
        warm_up(model, eng, reqs, args.prefill_chunk, baseline=i == 0)
    warm_s = time.perf_counter() - t

    burst = np.zeros(len(reqs))
    results = {}
    for k, eng in engines.items():
        results[("burst", k)] = run_engine(eng, reqs, burst, f"burst{k}-")
        print(f"engine decode_steps={k} burst: {results[('burst', k)]['tokens_per_s']:.1f} tok/s", flush=True)
    # the Poisson stream at --load times the best burst throughput (requests/s), the same for every server
    rate = args.load * len(reqs) / min(results[("burst", k)]["wall_s"] for k in ks)
    arrivals = np.cumsum(np.random.default_rng(1).exponential(1 / rate, len(reqs)))
    arrivals -= arrivals[0]
    for k, eng in engines.items():
        results[("poisson", k)] = run_engine(eng, reqs, arrivals, f"poisson{k}-")
        print(f"engine decode_steps={k} Poisson: {results[('poisson', k)]['tokens_per_s']:.1f} tok/s", flush=True)
    durations, _ = run_one_at_a_time(model, reqs, args.prefill_chunk)
    base_burst = replay_baseline(reqs, burst, durations)
    base_poisson = replay_baseline(reqs, arrivals, durations)

    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({label}); model: 4 layers, d=256, 16 experts top-4, vocab 32000, {args.dtype}, "
          f"kernels {model.kernels}; {len(reqs)} requests, prompts 16..{args.max_prompt}, max_tokens 16..{args.max_new}; "
          f"engine max_seqs {args.max_seqs}, prefill_chunk {args.prefill_chunk}; warm-up (compiles) {warm_s:.0f} s")
    head = f"{'arrivals':<16}{'server':<26}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}" \
           f"{'ITL p99':>10}{'occupancy':>10}"
    print(head)
    rows = []
    for scen, base, arr in (("burst", base_burst, "burst"), ("poisson", base_poisson, f"Poisson {rate:.2f}/s")):
        rows += [(arr, f"engine, decode_steps {k}", results[(scen, k)]) for k in ks]
        rows.append((arr, "generate, one at a time", base))
    for arr, name, r in rows:
        occ = "" if np.isnan(r["occupancy"]) else f"{r['occupancy']:.0%}"
        print(f"{arr:<16}{name:<26}{r['tokens_per_s']:>10.1f}{r['ttft_p50']:>9.2f}s{r['ttft_p99']:>9.2f}s"
              f"{r['itl_p50'] * 1e3:>8.1f}ms{r['itl_p99'] * 1e3:>8.1f}ms{occ:>10}")
    ratios = {f"{scen}/decode_steps={k}": results[(scen, k)]["tokens_per_s"] / b["tokens_per_s"]
              for scen, b in (("burst", base_burst), ("poisson", base_poisson)) for k in ks}
    print("throughput ratio (engine / one at a time): "
          + ", ".join(f"{name} {r:.2f}x" for name, r in ratios.items()) + f" ({label})")
    return dict(rate=rate, ratios=ratios, engine={f"{s}/{k}": v for (s, k), v in results.items()},
                baseline_burst=base_burst, baseline_poisson=base_poisson)


if __name__ == "__main__":
    sys.exit(main())
