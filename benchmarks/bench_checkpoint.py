"""Convert and load times and peak host memory for a random checkpoint of the real gpt-oss layout.

    python benchmarks/bench_checkpoint.py [--preset gpt-oss-20b] [--workdir /tmp/gptoss-bench] [--keep]

Each step runs in its own process so that its peak RSS (ru_maxrss) is its own. Host-side figures
(CPU backend); on a GPU/TPU machine the same script measures loading onto the accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

STEP = r"""
import json, os, resource, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
step, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if step == "write":
    from gptoss_jax import preset, write_random_checkpoint
    write_random_checkpoint(preset(dst), src, progress=False)
elif step == "convert":
    from gptoss_jax import convert
    convert(src, dst, progress=False)
else:
    import jax
    from gptoss_jax import load_model
    m = load_model(src, progress=False)
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(m)))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run(step, src, dst=""):
    out = subprocess.run([sys.executable, "-c", STEP, step, src, dst], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-oss-20b")
    ap.add_argument("--workdir", default="/tmp/gptoss-bench")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from gptoss_jax import preset
    from gptoss_jax.checkpoint import tensor_specs
    from gptoss_jax.model import abstract_model, count_params

    cfg = preset(args.preset)
    _, total = count_params(abstract_model(cfg))
    largest = max(__import__("math").prod(s.shape) * (1 if s.dtype == "U8" else 2) for s in tensor_specs(cfg))
    hf, orbax = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "orbax")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    res = {"preset": args.preset, "checkpoint_bytes": total, "largest_tensor_bytes": largest}
    try:
        res["write_random"] = run("write", hf, args.preset)
        res["load_safetensors"] = run("load", hf)
        res["convert"] = run("convert", hf, orbax)
        res["load_orbax"] = run("load", orbax)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    gib = 2**30
    print(f"{args.preset}: {total / gib:.2f} GiB of parameters (largest tensor {largest / gib:.2f} GiB), host CPU")
    for k in ("write_random", "load_safetensors", "convert", "load_orbax"):
        r = res[k]
        print(f"  {k:17s} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_bytes'] / gib:6.2f} GiB")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
