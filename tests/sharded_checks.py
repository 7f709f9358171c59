"""Multi-device checks, run as a subprocess by tests/test_sharding.py (jax must start with the CPU
device count set, which a pytest process that already imported jax cannot change).

  python tests/sharded_checks.py meshes CKPT OUT.json        8 CPU devices, several meshes
  python tests/sharded_checks.py kinds CKPT OUT.json         8 CPU devices, every way to build a mesh
  python tests/sharded_checks.py host I PORT CKPT OUT.npy    process I of 2 (2 CPU devices each)

Everything compared is computed here from the same checkpoint: the single-device model is the
reference for every sharded run.
"""

import json
import os
import sys
import time

mode = sys.argv[1]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("2" if mode == "host" else "8"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MESHES = [(1, 8, 1), (2, 2, 2), (1, 2, 4), (8, 1, 1)]
PROMPT_LENS = [21, 9, 30, 17, 5, 26, 12, 19]  # ragged, some longer than the window of 16


def ids_for(cfg, batch, length, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, length)).astype(np.int32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_meshes(ckpt, out):
    from gptoss_jax import load_model
    from gptoss_jax import sharding as shd
    from gptoss_jax.params import param_leaves
    from gptoss_jax.generate import generate

    assert len(jax.devices()) == 8, jax.devices()
    ref = load_model(ckpt, dtype="float32", kernels="xla", progress=False)
    cfg = ref.config
    ids = ids_for(cfg, 8, 24)
    ref_logits = np.asarray(ref(ids))
    ref_one = np.asarray(ref(ids[:, :1]))  # decode-sized: the gather path
    prompts = [ids_for(cfg, 1, n, seed=10 + i)[0].tolist() for i, n in enumerate(PROMPT_LENS)]
    ref_gen = generate(ref, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
    results = []
    for data, expert, model_ in MESHES:
        t = time.perf_counter()
        mesh = shd.make_mesh(data, expert, model_)
        m = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=mesh)
        leaves = param_leaves(m)
        want = shd.param_specs(m, mesh)
        wrong = [("/".join(map(str, p)), str(leaves[p].sharding.spec), str(s)) for p, s in want.items()
                 if not (isinstance(leaves[p].sharding, jax.sharding.NamedSharding)
                         and leaves[p].sharding.mesh == mesh and leaves[p].sharding.spec == s)]
        exp_total, exp_dev = 0, {}
        for p, leaf in leaves.items():
            if p[-1] in ("w1_blocks", "w1_scales", "w2_blocks", "w2_scales", "b1", "b2"):
                exp_total += leaf.nbytes
                for s in leaf.addressable_shards:
                    exp_dev[s.device.id] = exp_dev.get(s.device.id, 0) + s.data.nbytes
        attn_dev = {}
        for p, leaf in leaves.items():
            if p[-1] == "wq_DNH":
                for s in leaf.addressable_shards:
                    attn_dev[s.device.id] = attn_dev.get(s.device.id, 0) + s.data.nbytes
        logits = m(ids)
        one = m(ids[:, :1])
        gen = generate(m, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
        # the decode cache after prefill: shardings of k/v
        from gptoss_jax.generate import _prefill, _setup
        from flax import nnx
        pids, plens, _, max_len, chunk = _setup(m, prompts, 4, 0.0, None, None, 0, (), None, 512)
        gd, st = nnx.split(m)
        cache, _ = _prefill(m, gd, st, pids, plens, max_len, chunk)
        cwant = shd.cache_specs(cache, mesh)
        cache_ok = all(a.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, s), a.ndim)
                       for a, s in zip(cache.k + cache.v, cwant.k + cwant.v))
        cache_specs = sorted({str(a.sharding.spec) for a in cache.k + cache.v})
        want_cache = sorted({str(s) for s in cwant.k})
        results.append(dict(
            mesh=[data, expert, model_],
            rel_err=rel(logits, ref_logits), rel_err_decode_shape=rel(one, ref_one),
            logits_sharding=str(logits.sharding.spec) if hasattr(logits.sharding, "spec") else str(logits.sharding),
            tokens_equal=bool(np.array_equal(gen.tokens, ref_gen.tokens)),
            lengths_equal=bool(np.array_equal(gen.lengths, ref_gen.lengths)),
            wrong_shardings=wrong, n_params=len(want),
            expert_bytes_total=exp_total, expert_bytes_per_device=sorted(set(exp_dev.values())),
            wq_bytes_per_device=sorted(set(attn_dev.values())),
            cache_specs=cache_specs, cache_specs_expected=want_cache, cache_ok=bool(cache_ok),
            seconds=round(time.perf_counter() - t, 1)))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    # kernels="pallas" on a mesh: the MXFP4 kernel inside the expert shard_map, banded attention in
    # its own shard_map (heads over model, rows over data); experts re-laid shard by shard.
    t = time.perf_counter()
    mesh = shd.make_mesh(2, 2, 2)
    m = load_model(ckpt, dtype="float32", kernels="pallas", progress=False, mesh=mesh)
    leaves = param_leaves(m)
    kq = [leaves[p] for p in leaves if p[-1] in ("w1_q", "w1_s", "w2_q", "w2_s")]
    gen = generate(m, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
    pallas = dict(rel_err=rel(m(ids), ref_logits),
                  tokens_equal=bool(np.array_equal(gen.tokens, ref_gen.tokens)),
                  kernel_weights=len(kq), kernel_bytes_total=sum(a.nbytes for a in kq),
                  kernel_bytes_per_device=sorted({sum(sh.data.nbytes for a in kq for sh in a.addressable_shards
                                                      if sh.device == d) for d in mesh.devices.flat}),
                  seconds=round(time.perf_counter() - t, 1))
    print(json.dumps(pallas), file=sys.stderr, flush=True)
    with open(out, "w") as f:
        json.dump(dict(results=results, pallas=pallas, ref_tokens=np.asarray(ref_gen.tokens).tolist(),
                       kv_heads=cfg.num_key_value_heads, heads=cfg.num_attention_heads), f)


def build_mesh(kind, shape, devices):
    """The same (data, expert, model) mesh, built the three ways users do."""
    from jax.sharding import AxisType, Mesh

    from gptoss_jax import sharding as shd

    if kind == "jax.make_mesh":  # Explicit axes: JAX 0.10's default
        return jax.make_mesh(shape, shd.AXES, devices=devices)
    if kind == "jax.sharding.Mesh":  # Auto axes
        mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), shd.AXES)
        assert all(t == AxisType.Auto for t in mesh.axis_types)
        return mesh
    return shd.make_mesh(*shape, devices=devices)


MESH_KINDS = ("jax.make_mesh", "jax.sharding.Mesh", "gptoss_jax.sharding.make_mesh")
# 1, 2, 4 and 8 devices: the Explicit kind (JAX's default) on each, every kind on 8
KIND_RUNS = [("jax.make_mesh", (1, 1, 1)), ("jax.make_mesh", (1, 2, 1)), ("jax.make_mesh", (1, 2, 2))] + \
    [(kind, (2, 2, 2)) for kind in MESH_KINDS]


def loss_and_grads(model, ids):
    """Fine-tuning's loss and the gradients of two dense weights (full fine-tuning's first step)."""
    from flax import nnx

    from gptoss_jax.finetune import loss_fn

    mask = np.ones(ids.shape, bool)
    loss, grads = jax.jit(lambda m, i, k: nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(m, i, k))(
        model, ids, mask)
    return float(loss), np.asarray(grads["lm_head_VD"][...]), np.asarray(grads["blocks"][1]["attn"]["wo_NHD"][...])


def run_kinds(ckpt, out):
    """model(ids), generate, a fine-tuning gradient and the aot compile on every kind of mesh."""
    from gptoss_jax import aot, load_model
    from gptoss_jax.generate import generate

    ref = load_model(ckpt, dtype="float32", kernels="xla", progress=False)
    cfg = ref.config
    ids = ids_for(cfg, 8, 24)
    ref_logits = np.asarray(ref(ids))
    prompts = [ids_for(cfg, 1, n, seed=10 + i)[0].tolist() for i, n in enumerate(PROMPT_LENS)]
    ref_gen = generate(ref, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
    ref_loss, ref_g1, ref_g2 = loss_and_grads(ref, ids)
    results = []
    for kind, shape in KIND_RUNS:
        devices = jax.devices()[:int(np.prod(shape))]
        t = time.perf_counter()
        mesh = build_mesh(kind, shape, devices)
        m = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=mesh)
        logits = m(ids)
        gen = generate(m, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
        loss, g1, g2 = loss_and_grads(m, ids)
        wq = m.blocks[0].attn.wq_DNH[...]
        r = dict(kind=kind, mesh=list(shape), axis_types=[str(a) for a in mesh.axis_types],
                 rel_err=rel(logits, ref_logits), tokens_equal=bool(np.array_equal(gen.tokens, ref_gen.tokens)),
                 loss_err=abs(loss - ref_loss) / abs(ref_loss), grad_err=max(rel(g1, ref_g1), rel(g2, ref_g2)),
                 params_on_user_mesh=bool(wq.sharding.mesh == mesh),
                 logits_on_user_mesh=bool(logits.sharding.mesh == mesh),
                 seconds=round(time.perf_counter() - t, 1))
        if shape == (2, 2, 2):
            np.save(out + f".{kind}.npy", np.asarray(logits))
            # the deployment plan's programs (gptoss-jax aot), compiled for this mesh
            p = aot.plan_for_mesh(cfg, mesh, batch=8, max_len=64, prefill_chunk=16)
            r["aot_programs"] = sorted(p["programs"])
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    mesh = build_mesh("jax.make_mesh", (2, 2, 2), jax.devices())
    m = load_model(ckpt, dtype="float32", kernels="pallas", progress=False, mesh=mesh)
    gen = generate(m, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=())
    pallas = dict(rel_err=rel(m(ids), ref_logits), tokens_equal=bool(np.array_equal(gen.tokens, ref_gen.tokens)))
    print(json.dumps(pallas), file=sys.stderr, flush=True)
    np.save(out + ".ids.npy", ids)
    with open(out, "w") as f:
        json.dump(dict(results=results, pallas=pallas), f)


def run_host(i, port, ckpt, out):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=i)
    from jax.experimental import multihost_utils

    from gptoss_jax import load_model
    from gptoss_jax import sharding as shd

    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    mesh = shd.make_mesh(data=1, expert=2, model=2)  # each process holds one expert shard (2 of 4 heads)
    m = load_model(ckpt, dtype="float32", kernels="xla", progress=False, mesh=mesh)
    ids = ids_for(m.config, 2, 24)  # the same host array on both processes
    logits = multihost_utils.process_allgather(m(ids), tiled=True)
    per_dev = sorted(set(shd.bytes_per_device(m).values()))
    # the same over a mesh from jax.make_mesh (Explicit axes)
    explicit = load_model(ckpt, dtype="float32", kernels="xla", progress=False,
                          mesh=jax.make_mesh((1, 2, 2), shd.AXES))
    logits_explicit = multihost_utils.process_allgather(explicit(ids), tiled=True)
    from gptoss_jax.generate import generate

    prompts = [ids_for(m.config, 1, n, seed=10 + j)[0].tolist() for j, n in enumerate(PROMPT_LENS[:2])]
    # rows are split over `data` (size 1 here): the tokens are replicated, whole on every process
    gen = {name: generate(mm, prompts, max_new_tokens=12, temperature=0.0, stop_tokens=()).tokens
           for name, mm in (("auto", m), ("explicit", explicit))}
    if i == 0:
        np.save(out, np.asarray(logits))
        np.save(out + ".explicit.npy", np.asarray(logits_explicit))
        for name, toks in gen.items():
            np.save(out + f".tokens_{name}.npy", np.asarray(toks))
        with open(out + ".json", "w") as f:
            json.dump(dict(param_bytes_per_local_device=per_dev), f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if mode == "meshes":
        run_meshes(sys.argv[2], sys.argv[3])
    elif mode == "kinds":
        run_kinds(sys.argv[2], sys.argv[3])
    else:
        run_host(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
