"""Deployment plans from `gptoss-jax aot`: memory per device and the decode roofline bound.

    python benchmarks/deployment_plans.py [--json-dir DIR] [--only 20b-h100,...]

Runs `gptoss-jax aot ... --json` for each plan (a subprocess each: deviceless compiles, no weights,
no accelerator) and prints a markdown table. The tokens/s column is an UPPER BOUND from the roofline
(bytes one device reads per decode step / its HBM bandwidth), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PLANS = {
    "20b-h100": ("h100", "gpt-oss-20b", ["--devices", "1"]),
    "20b-v5e": ("tpu-v5e", "gpt-oss-20b", ["--devices", "1"]),
    "120b-h100": ("h100", "gpt-oss-120b", ["--devices", "1"]),
    "120b-v5e8": ("tpu-v5e", "gpt-oss-120b", ["--mesh", "expert=8"]),
    "120b-v6e8": ("tpu-v6e", "gpt-oss-120b", ["--mesh", "expert=8"]),
}


def run(name, batch, max_len, json_dir=None):
    target, model, extra = PLANS[name]
    cmd = [sys.executable, "-m", "gptoss_jax.cli", "aot", "--target", target, "--model", model, *extra,
           "--batch", str(batch), "--max-len", str(max_len), "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    plan["wall_seconds"] = round(time.perf_counter() - t, 1)
    if json_dir:
        os.makedirs(json_dir, exist_ok=True)
        with open(os.path.join(json_dir, f"{name}.json"), "w") as f:
            json.dump(plan, f, indent=1)
    print(f"{name}: {plan['wall_seconds']} s", file=sys.stderr)
    return plan


def table(plans: dict) -> str:
    rows = ["| model | target | mesh | batch / context | arguments (params + KV) per device | temp per device "
            "| total per device | device memory | fits | bytes read per decode step per device "
            "| decode tokens/s (roofline **bound**) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans.values():
        mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
        step = p["decode_bytes_per_step_per_device"]
        rows.append(
            f"| {p['model']} | {p['devices']} x {p['target']} | {mesh} | {p['batch']} / {p['max_len']} | "
            f"{p['argument_bytes'] / 1e9:.2f} GB | {p['temp_bytes'] / 1e9:.2f} GB | "
            f"{p['total_bytes_per_device'] / 1e9:.2f} GB | {p['device_memory_bytes'] / 1e9:.2f} GB | "
            f"{'yes' if p['fits'] else 'no'} | {step['total'] / 1e9:.2f} GB | "
            f"<= {p['decode_tokens_per_s_bound']:.0f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PLANS), help=f"comma-separated subset of {','.join(PLANS)}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--json-dir", default=None, help="also write each plan's JSON here")
    args = ap.parse_args()
    plans = {n: run(n, args.batch, args.max_len, args.json_dir) for n in args.only.split(",")}
    print(table(plans))
    print("\nBandwidths: H100 3.35 TB/s, v5e 819 GB/s, v6e 1.64 TB/s per chip. Bytes per decode step: the "
          "device's dense weight shards (embedding: B rows), min(E, B*k) routed experts per layer spread evenly "
          "over the expert axis, and its KV-cache slice at full context. Upper bounds, not measurements.")


if __name__ == "__main__":
    main()
