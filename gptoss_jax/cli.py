"""The `gptoss-jax` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _cmd_convert(args):
    from .checkpoint import convert

    t = time.perf_counter()
    convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst} in {time.perf_counter() - t:.1f} s")


def _cmd_random(args):
    from .checkpoint import RandomInit, write_random_checkpoint
    from .config import load_config, preset

    if (args.preset is None) == (args.config is None):
        sys.exit("gptoss-jax make-random-checkpoint: give exactly one of --preset or --config")
    cfg = preset(args.preset) if args.preset else load_config(args.config)
    t = time.perf_counter()
    write_random_checkpoint(cfg, args.dst, layout=args.layout, seed=args.seed, num_shards=args.num_shards,
                            init=None if args.zeros else RandomInit(), overwrite=args.overwrite,
                            progress=not args.quiet)
    print(f"wrote a random {args.preset or args.config} checkpoint ({args.layout} layout) to {args.dst} "
          f"in {time.perf_counter() - t:.1f} s")


def _cmd_info(args):
    from .config import load_config, preset
    from .model import abstract_model, count_params

    cfg = load_config(args.model) if os.path.exists(args.model) else preset(args.model)
    n_params, n_bytes = count_params(abstract_model(cfg))
    info = {"parameters": n_params, "bytes": n_bytes, "layers": cfg.num_hidden_layers,
            "experts": cfg.num_local_experts, "layer_types": list(cfg.layer_types)}
    print(json.dumps(info, indent=None if args.json else 2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss-jax", description="gpt-oss in JAX: convert, run, inspect")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a released checkpoint (HF folder, original/ folder or Hub id) "
                                       "to a faster-loading orbax folder")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_convert)

    r = sub.add_parser("make-random-checkpoint",
                       help="random weights in the exact released layout (MXFP4 packed, released shards)")
    r.add_argument("dst")
    r.add_argument("--preset", choices=["gpt-oss-20b", "gpt-oss-120b"])
    r.add_argument("--config", help="a config.json (HF or original) instead of a preset")
    r.add_argument("--layout", choices=["hf", "original"], default="hf")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-shards", type=int, default=None, help="default: as released")
    r.add_argument("--zeros", action="store_true",
                   help="all-zero weights as sparse files: the exact layout at almost no disk cost")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(fn=_cmd_random)

    i = sub.add_parser("info", help="parameter count and bytes of a preset or a checkpoint's config")
    i.add_argument("model", help="gpt-oss-20b, gpt-oss-120b, or a folder / config.json")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        sys.exit(f"gptoss-jax {args.command}: error: {e}")


if __name__ == "__main__":
    main()
