"""Engine runs on several devices, as subprocesses of tests/test_engine.py (jax must start with the
CPU device count set, which the pytest process cannot change).

  python tests/engine_checks.py mesh CKPT OUT.json              1 process, 4 CPU devices
  python tests/engine_checks.py host I PORT CKPT OUT            process I of 2 (2 CPU devices each)
  python tests/engine_checks.py structured CKPT OUT.json        1 process, 4 CPU devices: constrained
                                                                requests (tests/test_structured.py)

Both run the same requests (the 12 staggered greedy ones, the sampled ones and two sharing a prefix)
through an engine on a (data=2, expert=1, model=2) mesh: 4 slots over data, kv heads over model, a
paged cache of 5 pages of 32 positions per device (2 slots of 128 positions would need 8), so
requests wait, get preempted and reuse prefix pages on their shard.
"""

import json
import os
import sys

mode = sys.argv[1]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("2" if mode == "host" else "4"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MESH = (2, 1, 2)
ENGINE = dict(max_seqs=4, max_len=128, prefill_chunk=32, page_size=32)
PAGES = 5  # per device (per data shard): a page (32) is larger than the window (16)


def schedule(vocab_size):
    from engine_helpers import greedy_schedule, prefix_requests, sampled_requests

    sched, _ = greedy_schedule(vocab_size)
    sched = {k: list(v) for k, v in sched.items()}
    for i, (rid, v) in enumerate(sampled_requests(vocab_size).items()):
        sched.setdefault(2 + 4 * i, []).append((rid, *v))
    for i, (rid, v) in enumerate(prefix_requests(vocab_size).items()):
        sched.setdefault(50 + 6 * i, []).append((rid, *v))  # after the others: a shard to themselves
    return sched


def run(model):
    from gptoss_jax import Engine
    from gptoss_jax.kv import PagedCache
    from engine_helpers import run_schedule

    budget = PagedCache.budget(model, ENGINE["max_seqs"], ENGINE["max_len"], PAGES, page_size=ENGINE["page_size"])
    eng = Engine(model, **ENGINE, kv_cache_bytes=budget)
    res = run_schedule(eng, schedule(model.config.vocab_size))
    return dict(tokens={rid: r["tokens"] for rid, r in res.items() if rid is not None},
                cache_spec=_spec(eng._cache.k[1]), slot_spec=_spec(eng._slots_state.live),
                pages_per_shard=eng.kv.layout.pages_per_shard,
                stats={k: eng.stats[k] for k in ("preemptions", "prefix_hit_tokens")},
                process_count=jax.process_count(), devices=len(jax.devices()))


def _spec(a):
    """The mesh axis of each dimension (None: replicated), trailing Nones included."""
    spec = tuple(a.sharding.spec)
    return list(spec + (None,) * (a.ndim - len(spec)))


def run_mesh(ckpt, out):
    from gptoss_jax import load_model
    from gptoss_jax import sharding as shd

    assert len(jax.devices()) == 4, jax.devices()
    results = {}
    for kind, mesh in (("auto", shd.make_mesh(*MESH)), ("explicit", jax.make_mesh(MESH, shd.AXES))):
        model = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=mesh)
        results[kind] = run(model)
        print(kind, "done", file=sys.stderr, flush=True)
    with open(out, "w") as f:
        json.dump(results, f)


def run_structured(ckpt, out):
    """test_structured's mixed batch (constrained and free requests) on Auto and Explicit meshes."""
    from gptoss_jax import load_model
    from gptoss_jax import sharding as shd
    from test_structured import run_mixed_batch

    results = {}
    for kind, mesh in (("auto", shd.make_mesh(*MESH)), ("explicit", jax.make_mesh(MESH, shd.AXES))):
        model = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=mesh)
        results[kind] = run_mixed_batch(model)
    with open(out, "w") as f:
        json.dump(results, f)


def run_host(i, port, ckpt, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=i, initialization_timeout=120)
    from gptoss_jax import load_model
    from gptoss_jax import sharding as shd

    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    model = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=shd.make_mesh(*MESH))
    result = run(model)
    with open(f"{out}.{i}.json", "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if mode == "mesh":
        run_mesh(sys.argv[2], sys.argv[3])
    elif mode == "structured":
        run_structured(sys.argv[2], sys.argv[3])
    else:
        run_host(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
