"""Deployment plans from `gptoss-jax aot`: memory per device, fit, largest context, decode roofline bound,
for inference and fine-tuning, on the runtimes people get (Colab's T4 / L4 / A100 / TPU v5e-1 / v6e-1,
H100 hosts).

    python benchmarks/deployment_plans.py [--json-dir DIR] [--reuse] [--only 20b-t4,...] [--list]

Runs `gptoss-jax aot ... --json` for each plan (a subprocess each: deviceless compiles, no weights, no
accelerator; minutes per plan, more with --max-context) and prints two markdown tables. Every figure is
a DEVICELESS PLAN: XLA's memory analysis of the compiled programs, not a measurement on the device.
The tokens/s column is an UPPER BOUND from the roofline (bytes one device reads per decode step / its
HBM bandwidth). --reuse reads a plan's JSON from --json-dir instead of compiling it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

INFERENCE = ["--program", "inference", "--max-context"]
PLANS = {
    # inference, gpt-oss-20b batch 1 on one device, with the largest context that fits
    "20b-t4": ["--target", "t4", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-t4-chunk128": ["--target", "t4", "--model", "gpt-oss-20b", "--devices", "1", "--prefill-chunk", "128",
                        *INFERENCE],
    "20b-l4": ["--target", "l4", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-a100-40g": ["--target", "a100-40g", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-a100-80g": ["--target", "a100-80g", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-h100": ["--target", "h100", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-v5e1": ["--target", "tpu-v5e", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    "20b-v6e1": ["--target", "tpu-v6e", "--model", "gpt-oss-20b", "--devices", "1", *INFERENCE],
    # inference, gpt-oss-120b
    "120b-h100": ["--target", "h100", "--model", "gpt-oss-120b", "--devices", "1", "--program", "inference"],
    "120b-v5e8": ["--target", "tpu-v5e", "--model", "gpt-oss-120b", "--mesh", "expert=8", "--program", "inference"],
    # fine-tuning: LoRA rank 8 on q, k, v, o (the default), AdamW; remat where it is needed to fit
    "ft-20b-l4": ["--target", "l4", "--model", "gpt-oss-20b", "--program", "finetune", "--seq-len", "1024"],
    "ft-20b-l4-remat": ["--target", "l4", "--model", "gpt-oss-20b", "--program", "finetune", "--seq-len", "1024",
                        "--remat"],
    "ft-20b-a100-40g": ["--target", "a100-40g", "--model", "gpt-oss-20b", "--program", "finetune",
                        "--seq-len", "2048"],
    "ft-20b-v5e1": ["--target", "tpu-v5e", "--model", "gpt-oss-20b", "--program", "finetune", "--seq-len", "1024",
                    "--remat"],
    "ft-20b-v6e1": ["--target", "tpu-v6e", "--model", "gpt-oss-20b", "--program", "finetune", "--seq-len", "1024",
                    "--remat"],
    "ft-20b-full-h100": ["--target", "h100", "--model", "gpt-oss-20b", "--program", "finetune", "--seq-len", "1024",
                         "--lora-rank", "0", "--remat"],
    "ft-120b-8xh100": ["--target", "h100", "--model", "gpt-oss-120b", "--program", "finetune", "--mesh",
                       "data=2,expert=4", "--batch-size", "2", "--seq-len", "2048", "--remat"],
}


def run(name, json_dir=None, reuse=False):
    path = os.path.join(json_dir, f"{name}.json") if json_dir else None
    if reuse and path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "gptoss_jax.cli", "aot", *PLANS[name], "--json"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    plan["wall_seconds"] = round(time.perf_counter() - t, 1)
    if path:
        os.makedirs(json_dir, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(plan, f, indent=1)
        os.replace(tmp, path)
    print(f"{name}: {plan['wall_seconds']} s", file=sys.stderr)
    return plan


def _gb(b):
    return f"{b / 1e9:.2f} GB"


def _where(p):
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1)
    return f"{p['devices']} x {p['target']}" + (f" ({mesh})" if mesh else "")


def inference_table(plans) -> str:
    rows = ["| model | target | kernels, dtype | batch / context / prefill chunk | params + KV per device "
            "| temp per device | total per device | usable (device - reserve) | fits | largest context that fits "
            "| decode tokens/s (roofline **bound**) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        mc = p.get("max_context")
        ctx = "-" if mc is None else (str(mc["max_len"]) if mc["max_len"] else "none")
        rows.append(
            f"| {p['model']} | {_where(p)} | {p['kernels']}, {p['dtype']} | {p['batch']} / {p['max_len']} / "
            f"{p['prefill_chunk']} | {_gb(p['argument_bytes'])} | {_gb(p['temp_bytes'])} | "
            f"{_gb(p['total_bytes_per_device'])} | {_gb(p['usable_bytes'])} | {'yes' if p['fits'] else '**no**'} | "
            f"{ctx} | <= {p['decode_tokens_per_s_bound']:.0f} |")
    return "\n".join(rows)


def finetune_table(plans) -> str:
    rows = ["| model | target | kernels, dtype | training | batch x seq | remat | trainable parameters "
            "| arguments per device | temp per device | total per device | usable (device - reserve) | fits |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        what = f"LoRA r={p['lora_rank']}" if p["lora_rank"] else "full (dense weights)"
        rows.append(
            f"| {p['model']} | {_where(p)} | {p['kernels']}, {p['dtype']} | {what} | {p['batch_size']} x {p['seq_len']} "
            f"| {'yes' if p['remat'] else 'no'} | {p['trainable_parameters'] / 1e6:.1f} M | {_gb(p['argument_bytes'])} "
            f"| {_gb(p['temp_bytes'])} | {_gb(p['total_bytes_per_device'])} | {_gb(p['usable_bytes'])} "
            f"| {'yes' if p['fits'] else '**no**'} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PLANS), help=f"comma-separated subset of {','.join(PLANS)}")
    ap.add_argument("--json-dir", default=None, help="also write each plan's JSON here")
    ap.add_argument("--reuse", action="store_true", help="read plans already in --json-dir instead of compiling")
    ap.add_argument("--list", action="store_true", help="print each plan's command and exit")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(PLANS))
    if unknown:
        ap.error(f"unknown plans {unknown}; known: {', '.join(PLANS)}")
    if args.list:
        for n in names:
            print(f"{n}: gptoss-jax aot {' '.join(PLANS[n])}")
        return
    plans = [run(n, args.json_dir, args.reuse) for n in names]
    inf = [p for p in plans if p["program"] == "inference"]
    ft = [p for p in plans if p["program"] == "finetune"]
    if inf:
        print(inference_table(inf))
    if ft:
        print("\n" + finetune_table(ft))
    print("\nDeviceless plans (XLA memory analysis of the compiled programs for each target), not measurements. "
          "Usable memory: the device's, less the runtime's reserve (GPUs: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; TPUs: "
          "what the TPU runtime keeps). Decode tokens/s: bytes one device reads per decode step at the full context "
          "(its dense weight shards, min(E, B*k) routed experts per layer, its KV-cache slice) over its HBM "
          "bandwidth: an upper bound.")


if __name__ == "__main__":
    main()
