"""Driving the serving engine in tests (in-process and in tests/engine_checks.py subprocesses)."""

from __future__ import annotations

import numpy as np

from gptoss_jax.engine import SamplingParams


def prompt(vocab_size: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, n).astype(int).tolist()


def run_schedule(eng, schedule: dict, *, max_steps: int = 10_000) -> dict:
    """schedule: {step: [(request_id, prompt, SamplingParams), ...]} added just before that step.

    Returns {request_id: {"tokens", "logprobs", "top", "reason", "first_step", "last_step"}} and, under the
    key None, {"steps", "max_busy"} (the most slots taken after any step). On several processes only
    process 0 adds; every process runs the same loop (has_unfinished_requests is collective)."""
    import jax

    out, last, step, max_busy = {}, max(schedule, default=0), 0, 0
    while step <= last or eng.has_unfinished_requests():
        if jax.process_index() == 0:
            for rid, ids, params in schedule.get(step, ()):
                eng.add_request(ids, params, request_id=rid)
        for o in eng.step():
            r = out.setdefault(o.request_id, dict(tokens=[], logprobs=[], top=[], reason=None, first_step=step))
            assert r["reason"] is None, f"{o.request_id} reported after it finished"
            r["tokens"] += o.new_token_ids
            r["logprobs"] += o.logprobs or []
            r["top"] += o.top_logprobs or []
            r["last_step"] = step
            if o.finished:
                r["reason"] = o.finish_reason
        max_busy = max(max_busy, eng.max_seqs - eng.num_free_slots())
        step += 1
        assert step < max_steps, "the engine does not finish"
    out[None] = dict(steps=step, max_busy=max_busy)
    return out


# The staggered mix of the tests: 12 prompts of different lengths (1 to 48 tokens: one and two
# chunks of 32, longer than the window of 16), max_tokens 1..16, arriving at different steps.
PROMPT_LENS = [5, 37, 21, 16, 3, 48, 9, 30, 17, 1, 44, 26]
MAX_TOKENS = [10, 7, 16, 5, 12, 9, 16, 3, 11, 6, 1, 14]
ARRIVALS = [0, 0, 0, 2, 3, 3, 5, 8, 8, 9, 13, 14]


def greedy_schedule(vocab_size: int) -> tuple[dict, dict]:
    """(schedule, {request_id: (prompt, max_tokens)}) of the 12 greedy requests."""
    schedule, reqs = {}, {}
    for i, (n, m, at) in enumerate(zip(PROMPT_LENS, MAX_TOKENS, ARRIVALS)):
        rid = f"g{i}"
        ids = prompt(vocab_size, n, seed=100 + i)
        reqs[rid] = (ids, m)
        schedule.setdefault(at, []).append((rid, ids, SamplingParams(max_tokens=m, temperature=0.0,
                                                                     stop_token_ids=(), logprobs=True)))
    return schedule, reqs


# Sampled requests: (prompt length, max_tokens, params); settings differ per request.
SAMPLED = [
    (12, 10, dict(temperature=0.8, top_p=0.9, seed=1)),
    (29, 12, dict(temperature=1.3, top_k=5, seed=2)),
    (7, 9, dict(temperature=0.6, top_p=0.5, top_k=50, seed=3)),
    (40, 8, dict(temperature=1.0, seed=4)),
]


def sampled_requests(vocab_size: int) -> dict:
    """{request_id: (prompt, SamplingParams)}."""
    return {f"s{i}": (prompt(vocab_size, n, seed=200 + i),
                      SamplingParams(max_tokens=m, stop_token_ids=(), logprobs=True, **kw))
            for i, (n, m, kw) in enumerate(SAMPLED)}


# Two requests sharing a 70-token head (the paged cache's prefix reuse), long enough that, on a
# small pool, the second preempts or waits for the first.
PREFIX_HEAD = 70


def prefix_requests(vocab_size: int) -> dict:
    """{request_id: (prompt, SamplingParams)}: greedy, the same first 70 tokens."""
    head = prompt(vocab_size, PREFIX_HEAD, seed=400)
    return {f"p{i}": (head + prompt(vocab_size, n, seed=401 + i),
                      SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(), logprobs=True))
            for i, n in enumerate((6, 9))}
