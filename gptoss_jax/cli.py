"""The `gptoss-jax` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .platforms import start_jax
from .runtime import DTYPE_CHOICES, KERNEL_CHOICES


def _cmd_convert(args):
    from .checkpoint import convert

    t = time.perf_counter()
    convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst} in {time.perf_counter() - t:.1f} s")


def _cmd_random(args):
    from .checkpoint import RandomInit, write_random_checkpoint
    from .config import load_config, preset

    if (args.preset is None) == (args.config is None):
        raise ValueError("give exactly one of --preset or --config")
    if args.num_shards is not None and args.num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {args.num_shards}")
    from .sampling import validate_seed
    validate_seed(args.seed, "--seed")
    cfg = preset(args.preset) if args.preset else load_config(args.config)
    t = time.perf_counter()
    write_random_checkpoint(cfg, args.dst, layout=args.layout, seed=args.seed, num_shards=args.num_shards,
                            init=None if args.zeros else RandomInit(), overwrite=args.overwrite,
                            progress=not args.quiet)
    print(f"wrote a random {args.preset or args.config} checkpoint ({args.layout} layout) to {args.dst} "
          f"in {time.perf_counter() - t:.1f} s")


def _cmd_info(args):
    from .config import config_for
    from .model import abstract_model, count_params

    cfg = config_for(args.model)
    n_params, n_bytes = count_params(abstract_model(cfg))
    info = {"parameters": n_params, "bytes": n_bytes, "layers": cfg.num_hidden_layers,
            "experts": cfg.num_local_experts, "layer_types": list(cfg.layer_types)}
    print(json.dumps(info, indent=None if args.json else 2))


DEFAULT_MODEL = "openai/gpt-oss-20b"


def _load(args):
    from .api import load_model

    print(f"loading {args.model} ...", file=sys.stderr)
    t = time.perf_counter()
    # the progress bar only on a terminal: in a log it is one line of carriage returns
    model = load_model(args.model, dtype=args.dtype, kernels=args.kernels, progress=sys.stderr.isatty())
    if args.verbose:
        print(f"loaded in {time.perf_counter() - t:.1f} s ({model.kernels} kernels, {args.dtype})", file=sys.stderr)
    return model


class TokenClock:
    """When a reply's tokens arrive: `summary()` gives the prompt's time to first token (prefill,
    and the first run's compiles) and the decode rate from the second decode step on (the first
    one compiles the step)."""

    def __init__(self, prompt_tokens: int, clock=time.perf_counter):
        self.prompt_tokens, self.clock = prompt_tokens, clock
        self.start, self.times = clock(), []

    def tick(self):
        self.times.append(self.clock())

    def summary(self) -> str:
        n = len(self.times)
        if not n:
            return f"{self.prompt_tokens} prompt tokens, no token generated"
        line = f"{self.prompt_tokens} prompt tokens, first token after {self.times[0] - self.start:.2f} s"
        if n >= 3:
            rate = (n - 2) / max(self.times[-1] - self.times[1], 1e-9)
            line += f"; {n} tokens generated, decode {rate:.2f} tokens/s"
        else:
            line += f"; {n} token{'s' if n > 1 else ''} generated"
        return line


def _check_run_args(args):
    """Everything about sampling that can be checked without the model, before it loads (or downloads)."""
    from .sampling import validate_sampling, validate_seed

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    validate_sampling(1.0 if args.temperature is None else args.temperature,
                      1.0 if args.top_p is None else args.top_p, args.top_k)
    validate_seed(args.seed, "--seed")


def _sampling_kwargs(args):
    return dict(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


@dataclasses.dataclass
class _Reply:
    content: str  # what was printed as the answer (content deltas)
    tokens: list[int]  # the completion, through its stop token
    calls: list  # harmony's closed tool calls (ToolCall)


def _print_reply(model, prompt, args, *, harmony: bool, max_tokens: int | None = None, source=None) -> _Reply:
    """Stream the reply to stdout as it is generated and return it. Read as harmony (the answer; the
    reasoning too with --show-reasoning) or, with harmony=False, as plain text. Output that is not
    valid harmony (an untrained model) is printed as its raw text, never dropped. `source`: the
    reply's tokens ([1] arrays) when not from `generate_stream` (a constrained reply's engine)."""
    from .generate import generate_stream
    from .harmony import CompletionDecoder

    stops = tuple(model.generation_defaults.stop_tokens)
    decoder = CompletionDecoder(stop_tokens=None if harmony else stops, harmony=harmony)
    content, tokens, shown = [], [], None

    def show(deltas):
        nonlocal shown
        for d in deltas:
            if d.kind == "content":
                content.append(d.text)
            if not (args.show_reasoning or d.kind == "content"):
                continue
            if args.show_reasoning and d.kind != shown:
                sys.stdout.write(f"\n[{d.kind}{' to ' + d.recipient if d.recipient else ''}] ")
                shown = d.kind
            sys.stdout.write(d.text)
            sys.stdout.flush()

    if source is None:
        kw = _sampling_kwargs(args)
        if max_tokens is not None:
            kw["max_new_tokens"] = max_tokens
        source = generate_stream(model, [prompt], **kw)
    clock = TokenClock(len(prompt))
    for tok in source:
        clock.tick()
        tokens.append(int(tok[0]))
        show(decoder.feed(int(tok[0])))
        if decoder.done or int(tok[0]) in stops:
            break
    show(decoder.finish())
    if decoder.error and harmony:
        print(f"\n[the reply is not valid harmony ({decoder.error}): shown as raw text]", file=sys.stderr)
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[{clock.summary()}]", file=sys.stderr)
    return _Reply("".join(content), tokens, list(decoder.tool_calls))


CHAT_CONVERSATION = "chat"  # the chat command's one conversation (its tool sessions)


def tool_turn(generate, prompt: list[int], max_tokens: int, toolbox, *, report=None) -> str:
    """One assistant turn with built-in tools: generate (generate(prompt, max_tokens) -> _Reply), run
    the built-in call that ended the completion, append its answer, generate again; until the model
    answers, `max_tokens` (over the rounds) is spent or the calls pass the toolbox's limit. Returns the
    answer's text. report(call, result): shows each call."""
    from .tools.rounds import ended_with_call, limit_reached, next_prompt

    names = toolbox.names if toolbox is not None else ()
    calls = 0
    while True:
        reply = generate(prompt, max_tokens)
        max_tokens -= len(reply.tokens)
        call = ended_with_call(reply.tokens, reply.calls, toolbox, names)
        if call is None or max_tokens < 1 or calls > toolbox.max_tool_calls:
            return reply.content
        if calls < toolbox.max_tool_calls:
            result = toolbox.run(CHAT_CONVERSATION, call)
        else:
            result = limit_reached(call, toolbox.max_tool_calls)
        calls += 1
        if report is not None:
            report(call, result)
        prompt, _ = next_prompt(prompt, reply.tokens, result)


def _report_tool(args):
    def report(call, result):
        status = " (failed)" if result.failed else ""
        if args.show_reasoning:
            sys.stdout.write(f"\n[{call.recipient} output{status}]\n{result.output}\n")
        else:
            print(f"[{call.recipient}{status}]", file=sys.stderr)
    return report


def _assistant_turn(model, messages, args, toolbox=None):
    """Render the conversation and stream the assistant's reply (running its built-in tool calls);
    returns the answer's text."""
    from .harmony import render_prompt

    system_tools = toolbox.configs(toolbox.names) if toolbox is not None else None
    prompt = render_prompt(messages, reasoning_effort=args.reasoning_effort, system_tools=system_tools)
    return tool_turn(lambda p, n: _print_reply(model, p, args, harmony=True, max_tokens=n), prompt,
                     args.max_tokens, toolbox, report=_report_tool(args))


def _toolbox(args):
    """The toolbox of --tool and its options (None without --tool), checked before the model loads."""
    from .tools import make_toolbox

    if args.python_memory < 0:
        raise ValueError(f"--python-memory must be >= 0, got {args.python_memory}")
    return make_toolbox(args.tool, browser_dir=args.browser_dir, search_api_key=args.search_api_key,
                        python_timeout_s=args.python_timeout, python_memory_bytes=int(args.python_memory * (1 << 30)),
                        max_tool_calls=args.max_tool_calls)


def _read_schema(args):
    """--json-schema FILE, checked (features and token budget) before the model loads."""
    from pathlib import Path

    from .structured import final_json, harmony_reply

    if args.json_schema is None:
        if args.max_reasoning_tokens is not None:
            raise ValueError("--max-reasoning-tokens applies with --json-schema")
        return None
    if args.raw or args.tool:
        raise ValueError("--json-schema constrains one harmony reply: leave out --raw and --tool")
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-schema {path}: not valid JSON ({e})") from e
    harmony_reply(final_json(schema), max_tokens=args.max_tokens, max_reasoning_tokens=args.max_reasoning_tokens)
    name = schema.get("title") if isinstance(schema, dict) and isinstance(schema.get("title"), str) else path.stem
    return name, schema


def _constrained_tokens(model, prompt, args, schema):
    """The reply's tokens from a one-slot engine that applies the schema's token masks."""
    import numpy as np

    from .engine import Engine, SamplingParams

    eng = Engine(model, max_seqs=1, max_len=len(prompt) + args.max_tokens)
    eng.add_request(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                           top_k=args.top_k, seed=args.seed, json_schema=schema,
                                           max_reasoning_tokens=args.max_reasoning_tokens))
    while eng.has_unfinished_requests():
        for o in eng.step():
            yield from (np.array([t]) for t in o.new_token_ids)


def _cmd_generate(args):
    from .tokenizer import load_tokenizer

    if not args.prompt:
        raise ValueError("the prompt is empty")
    if args.raw and args.tool:
        raise ValueError("--tool needs the chat format: drop --raw")
    _check_run_args(args)
    fmt = _read_schema(args)
    enc = load_tokenizer()
    toolbox = _toolbox(args)
    try:
        model = _load(args)
        print("compiling ...", file=sys.stderr)  # the first tokens wait for prefill and decode to compile
        if fmt is not None:
            from .harmony import ResponseFormat, render_prompt

            prompt = render_prompt([{"role": "user", "content": args.prompt}], reasoning_effort=args.reasoning_effort,
                                   response_format=ResponseFormat(fmt[0], fmt[1]))
            _print_reply(model, prompt, args, harmony=True, source=_constrained_tokens(model, prompt, args, fmt[1]))
        elif args.raw:
            _print_reply(model, enc.encode(args.prompt, allowed_special="all"), args, harmony=False)
        else:
            _assistant_turn(model, [{"role": "user", "content": args.prompt}], args, toolbox)
    finally:
        if toolbox is not None:
            toolbox.close()


def _cmd_chat(args):
    _check_run_args(args)
    toolbox = _toolbox(args)
    try:
        model = _load(args)
        messages = []
        print("gpt-oss chat: type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            sys.stdout.write("gpt-oss> ")
            reply = _assistant_turn(model, messages, args, toolbox)
            messages.append({"role": "assistant", "content": reply, "channel": "final"})
    finally:
        if toolbox is not None:  # every kernel stopped, every session folder removed
            toolbox.close()


def _add_tool_options(p):
    from .tools import TOOL_NAMES
    from .tools.base import DEFAULT_MAX_TOOL_CALLS
    from .tools.python import DEFAULT_MEMORY_BYTES, DEFAULT_TIMEOUT_S

    p.add_argument("--tool", action="append", choices=TOOL_NAMES, default=[],
                   help="enable a built-in tool (repeatable): python RUNS MODEL-WRITTEN CODE ON THIS HOST (a Jupyter "
                        "kernel per conversation, not a sandbox); browser searches and reads pages")
    p.add_argument("--browser-dir", help="the browser's pages: the text, markdown and HTML files of this folder "
                                         "(default: the web)")
    p.add_argument("--search-api-key", help="Brave Search API key for the web browser's search "
                                            "(also $BRAVE_SEARCH_API_KEY)")
    p.add_argument("--python-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds per python call before the kernel is interrupted")
    p.add_argument("--python-memory", type=float, default=DEFAULT_MEMORY_BYTES / (1 << 30),
                   help="GiB of address space for the python kernel (RLIMIT_AS; 0: no limit)")
    p.add_argument("--max-tool-calls", type=int, default=DEFAULT_MAX_TOOL_CALLS,
                   help="built-in tool calls per request (or chat turn)")


def _add_run_options(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or Hugging Face id (default {DEFAULT_MODEL})")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default from the checkpoint (1.0)")
    p.add_argument("--top-p", type=float, default=None, help="default from the checkpoint (1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--show-reasoning", action="store_true", help="also print the analysis channel")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype (auto: what the device runs natively, float16 on a T4)")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    p.add_argument("--verbose", action="store_true", help="print the load time and each reply's tokens/s")


def _cmd_finetune(args):
    from .finetune import FinetuneConfig, finetune
    from .lora import DEFAULT_TARGETS

    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                         grad_accum=args.grad_accum, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                         lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS,
                         remat=args.remat, seed=args.seed, save_every=args.save_every, keep=args.keep,
                         reasoning_effort=args.reasoning_effort)
    mesh = None
    if args.mesh:  # as `gptoss-jax aot --mesh` plans it: experts over `expert`, the batch over `data`
        from .sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))

    def log(step, loss):
        if args.log_every and (step % args.log_every == 0 or step == cfg.steps):
            print(f"step {step}: loss {loss:.4f}", file=sys.stderr)

    t = time.perf_counter()
    res = finetune(args.model, args.data, cfg, out_dir=args.out, resume=args.resume, dtype=args.dtype,
                   kernels=args.kernels, mesh=mesh, progress=not args.quiet, log=log)
    summary = {**res.summary(), "seconds": round(time.perf_counter() - t, 2),
               "mesh": None if mesh is None else {a: int(n) for a, n in mesh.shape.items()}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"fine-tuned {res.step} steps: loss {res.first_loss:.4f} -> {res.last_loss:.4f}; "
              f"model (Hugging Face layout) in {args.out}, training state in {args.out}/train_state")


def _add_finetune_parser(sub):
    f = sub.add_parser("finetune", help="fine-tune on a JSONL chat dataset (LoRA by default); writes a loadable "
                                        "Hugging Face-layout model to --out, resumable training state under it")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or Hugging Face id (default {DEFAULT_MODEL})")
    f.add_argument("--data", required=True, help='JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} a line')
    f.add_argument("--steps", type=int, required=True, help="optimizer steps")
    f.add_argument("--out", required=True, help="output folder (model files + train_state/ + train_log.jsonl)")
    f.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; 0 = full fine-tuning of the dense weights")
    f.add_argument("--lora-alpha", type=float, default=None, help="default 2 * rank")
    f.add_argument("--lora-targets", default=None, help="comma-separated subset of q,k,v,o,router (default q,k,v,o)")
    f.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warmup, then cosine decay)")
    f.add_argument("--warmup-steps", type=int, default=None, help="default 10%% of --steps")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--clip-norm", type=float, default=1.0)
    f.add_argument("--batch-size", type=int, default=1)
    f.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    f.add_argument("--seq-len", type=int, default=1024)
    f.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (less "
                                                        "activation memory; `gptoss-jax aot --program finetune` "
                                                        "says when it is needed)")
    f.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (batch over data, experts over expert; "
                                  "default: one device)")
    f.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    f.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    f.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium",
                   help="system message of examples that do not set their own")
    f.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype (auto: what the device runs natively, float16 on a T4)")
    f.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    f.add_argument("--log-every", type=int, default=10, help="print the loss every N steps (0: never)")
    f.add_argument("--json", action="store_true", help="end with one JSON line: first_loss, last_loss, steps, ...")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(fn=_cmd_finetune)


def _cmd_serve(args):
    from .server import serve

    toolbox = _toolbox(args)
    try:
        serve(args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
              max_seqs=args.max_seqs, max_len=args.max_len, prefill_chunk=args.prefill_chunk, mesh=args.mesh,
              kernels=args.kernels, dtype=args.dtype, api_key=args.api_key, max_waiting=args.max_waiting,
              toolbox=toolbox, kv_cache_gb=args.kv_cache_gb)
    finally:
        if toolbox is not None:
            toolbox.close()


def _add_serve_parser(sub):
    from .server.app import DEFAULT_MAX_WAITING

    s = sub.add_parser("serve", help="an OpenAI-compatible server (chat completions, responses, completions)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"local folder or Hugging Face id (default {DEFAULT_MODEL})")
    s.add_argument("--served-model-name", help="the model name clients send (default: the folder name or Hub id)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.add_argument("--max-seqs", type=int, default=16, help="decode slots: requests running at once")
    s.add_argument("--max-len", type=int, default=8192, help="prompt + completion tokens per request")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step at most")
    s.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help="requests queued beyond the slots before 503")
    s.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4,model=1 (default: one device)")
    s.add_argument("--kv-cache-gb", type=float, default=None,
                   help="the paged KV cache per device in GB (default: every slot can reach --max-len); "
                        "requests wait or are preempted when it is full, and the startup line says how many "
                        "tokens it holds")
    s.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype (auto: what the device runs natively, float16 on a T4)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (also $GPTOSS_API_KEY)")
    _add_tool_options(s)
    s.set_defaults(fn=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptoss-jax", description="gpt-oss in JAX: convert, run, inspect")
    p.set_defaults(compile_only=False)  # aot's parser sets True
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

    g = sub.add_parser("generate", help="generate from a prompt (harmony chat format unless --raw), streamed")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="complete the prompt text as is, no chat format")
    g.add_argument("--json-schema", metavar="FILE",
                   help="a JSON schema file: the answer is JSON that validates against it (docs/structured.md)")
    g.add_argument("--max-reasoning-tokens", type=int, default=None,
                   help="with --json-schema: the analysis budget (default half of --max-tokens)")
    _add_run_options(g)
    _add_tool_options(g)
    g.set_defaults(fn=_cmd_generate)

    ch = sub.add_parser("chat", help="interactive multi-turn harmony chat")
    _add_run_options(ch)
    _add_tool_options(ch)
    ch.set_defaults(fn=_cmd_chat)

    i = sub.add_parser("info", help="parameter count and bytes of a preset or a checkpoint's config")
    i.add_argument("model", help="gpt-oss-20b, gpt-oss-120b, or a folder / config.json")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)

    _add_finetune_parser(sub)
    _add_serve_parser(sub)

    from .aot import add_parser as _add_aot_parser  # deviceless deployment plans (gptoss_jax/aot.py)
    _add_aot_parser(sub)
    return p


USER_ERRORS = (ValueError, OSError, RuntimeError)  # CheckpointError and ConfigError are ValueErrors
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def main(argv=None):
    """Run one command. A user error prints one line, `gptoss-jax <cmd>: error: ...`, and exits 2;
    Ctrl-C exits 130 (temporary folders are removed on the way out)."""
    args = build_parser().parse_args(argv)
    try:
        if not args.compile_only:  # aot pins its compile-only CPU backend itself
            start_jax()
        args.fn(args)
    except USER_ERRORS as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"gptoss-jax {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"gptoss-jax {args.command}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
