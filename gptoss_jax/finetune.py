"""Fine-tuning gpt-oss with optax: LoRA (default) or full fine-tuning of the dense parameters.

Data: JSONL, one conversation per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Messages take the keys of `gptoss_jax.harmony.ChatMessage` (role, content, channel, recipient, name,
content_type); a line may also give "reasoning_effort", "instructions", "tools" and
"conversation_start_date" (as `build_conversation`). Each conversation is rendered with harmony's
`render_conversation_for_training` (earlier turns' analysis dropped, the last final answer ending in
<|return|>). The loss covers exactly the tokens the assistant produces: in every assistant message,
everything after its `<|start|>assistant` header start (channel, recipient, content type, content, and
the <|end|> / <|return|> / <|call|> that ends it); system, developer, user and tool messages and the
`<|start|>assistant` tokens themselves are not trained on.

What trains: LoRA adapters (`gptoss_jax.lora.LoRAParam`, float32) by default; with rank 0 every
`nnx.Param` (embeddings, attention, norms, router, expert biases, unembedding; upcast to float32 master
weights). The MXFP4 expert weights are `PackedParam` variables: always frozen.

Optimizer: AdamW (float32 moments) with linear warmup then cosine decay to `end_lr_fraction * lr`,
global-norm clipping, and `optax.MultiSteps` when `grad_accum > 1` (one optimizer step every
`grad_accum` micro-batches; `steps` counts optimizer steps).

Checkpoints (orbax `CheckpointManager`, async) under `<out>/train_state/<step>/`: the trainable
parameters, the optimizer state, and a JSON item with the step, the data position, the RNG key (it
draws the data order of every epoch), the loss history and the run's settings. Resuming restores all
of it, so a resumed run produces the same later losses as an uninterrupted one.

Export: the adapters merged into a copy of the model that shares the frozen arrays, written with
`save_checkpoint` in the Hugging Face layout at `<out>` (experts unchanged and packed): `load_model(out)`
and transformers load it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import lora as lora_lib
from .checkpoint import HF_INDEX, CheckpointError, release_shards, save_checkpoint, tensor_specs
from .checkpoint.atomic import remove_path, scratch_dir
from .errors import read_json_object, same_or_nested
from .params import flat_key, param_path

TRAIN_STATE_DIR = "train_state"
_DEFAULT_PAD = 199999  # <|endoftext|>: padding when the config names none
MANIFEST = "gptoss_finetune.json"  # marks a folder as a run's output; lists the files its export wrote
LOG_FILE = "train_log.jsonl"
_ASSISTANT = "assistant"


# ---------------------------------------------------------------------------------------------
# Data: harmony rendering and the assistant-token loss mask
# ---------------------------------------------------------------------------------------------
def assistant_mask(tokens: Sequence[int], encoding=None) -> np.ndarray:
    """bool [T]: True on the tokens the assistant produces, read from the harmony token structure.

    The rendered stream is a sequence of messages ``<|start|>{author}... <|end|>|<|return|>|<|call|>``;
    a message whose author token right after ``<|start|>`` is ``assistant`` is the assistant's, and
    all of its tokens after those two are marked, up to and including the token that ends it.
    """
    from . import tokenizer as tok
    from .harmony import load_harmony_encoding

    enc = encoding or load_harmony_encoding()
    assistant_ids = enc.encode(_ASSISTANT, allowed_special=set())
    if len(assistant_ids) != 1:
        raise RuntimeError(f"'assistant' is not a single token ({assistant_ids})")
    a_id = assistant_ids[0]
    ends = {tok.END, tok.RETURN, tok.CALL}
    toks = np.asarray(tokens, np.int64)
    mask = np.zeros(len(toks), bool)
    inside = False
    for i, t in enumerate(toks):
        if t == tok.START:
            inside = i + 1 < len(toks) and toks[i + 1] == a_id
            start = i + 2
            continue
        if inside and i >= start:
            mask[i] = True
            if t in ends:
                inside = False
    return mask


_RENDER_KEYS = ("reasoning_effort", "instructions", "tools", "conversation_start_date", "model_identity",
                "knowledge_cutoff")


def render_example(example: dict | Sequence, *, reasoning_effort: str = "medium",
                   encoding=None) -> tuple[np.ndarray, np.ndarray]:
    """One conversation (a JSONL record or a list of messages) -> (token ids int32 [T], loss mask bool [T])."""
    from .harmony import build_conversation, load_harmony_encoding

    if not isinstance(example, dict):
        example = {"messages": list(example)}
    if "messages" not in example:
        raise ValueError("a training example needs a 'messages' list")
    unknown = set(example) - {"messages", *_RENDER_KEYS}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in a training example")
    kw = {k: example[k] for k in _RENDER_KEYS if k in example}
    kw.setdefault("reasoning_effort", reasoning_effort)
    enc = encoding or load_harmony_encoding()
    conv = build_conversation(example["messages"], **kw)
    ids = np.asarray(enc.render_conversation_for_training(conv), np.int32)
    return ids, assistant_mask(ids, enc)


def read_jsonl_lines(path: str) -> list[tuple[str, dict]]:
    """("path:line", record) for every non-blank line; each line must be one JSON object."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object {{\"messages\": [...]}}, got a {type(rec).__name__}")
        out.append((f"{path}:{n}", rec))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def read_jsonl(path: str) -> list[dict]:
    return [rec for _, rec in read_jsonl_lines(path)]


@dataclasses.dataclass
class Dataset:
    """Rendered examples right-padded / truncated to `seq_len`: ids [N, L] int32, mask [N, L] bool."""

    ids: np.ndarray
    mask: np.ndarray
    truncated: int = 0

    @classmethod
    def from_examples(cls, examples: Iterable, seq_len: int, *, pad_id: int = _DEFAULT_PAD,
                      reasoning_effort: str = "medium", labels: Sequence[str] | None = None) -> "Dataset":
        """`labels`: how errors name each example (default "example <i>"; from_jsonl: "path:line").
        Every example must leave the loss at least one assistant token within `seq_len`."""
        from openai_harmony import HarmonyError

        from .harmony import load_harmony_encoding

        enc = load_harmony_encoding()
        rows, masks, truncated = [], [], 0
        for i, ex in enumerate(examples):
            label = labels[i] if labels is not None else f"example {i}"
            try:
                ids, mask = render_example(ex, reasoning_effort=reasoning_effort, encoding=enc)
            except (ValueError, TypeError, KeyError, HarmonyError) as e:
                raise ValueError(f"{label}: {e}") from None
            if not mask[1:].any():
                raise ValueError(f"{label}: no assistant tokens to train on (the conversation needs an assistant "
                                 "message)")
            if len(ids) > seq_len:
                truncated += 1
                first = int(np.argmax(mask))
                ids, mask = ids[:seq_len], mask[:seq_len]
                if not mask[1:].any():
                    raise ValueError(f"{label}: no assistant tokens within the first {seq_len} tokens (the "
                                     f"assistant's reply starts at token {first}): raise seq_len or shorten it")
            pad = seq_len - len(ids)
            rows.append(np.pad(ids, (0, pad), constant_values=pad_id))
            masks.append(np.pad(mask, (0, pad)))
        if not rows:
            raise ValueError("no training examples")
        return cls(np.stack(rows).astype(np.int32), np.stack(masks), truncated)

    @classmethod
    def from_jsonl(cls, path: str, seq_len: int, **kw) -> "Dataset":
        labels, records = zip(*read_jsonl_lines(path))
        return cls.from_examples(records, seq_len, labels=labels, **kw)

    def __len__(self):
        return len(self.ids)

    def indices(self, start: int, count: int, rng_key) -> np.ndarray:
        """Example indices of positions start .. start+count-1 of the endless shuffled stream: epoch e
        is a permutation drawn from fold_in(rng_key, e)."""
        n = len(self)
        out, perms = [], {}
        for k in range(start, start + count):
            e = k // n
            if e not in perms:
                perms[e] = np.asarray(jax.random.permutation(jax.random.fold_in(rng_key, e), n))
            out.append(perms[e][k % n])
        return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# Loss and optimizer
# ---------------------------------------------------------------------------------------------
def loss_fn(model, ids_BL, mask_BL, remat: bool = False):
    """Mean next-token cross-entropy over the target tokens whose mask is set (in the model's
    sharding regime, so any mesh works). `remat`: recompute each block in the backward pass."""
    nll = functools.partial(_masked_nll, remat=remat)  # static: not an argument of the sharding region
    return model.within_runtime(nll, jax.sharding.PartitionSpec(), ids_BL, mask_BL)


def _masked_nll(model, ids_BL, mask_BL, *, remat: bool):
    logits = model.forward(ids_BL[:, :-1], remat=remat)  # float32 [B, L-1, V]
    targets, m = ids_BL[:, 1:], mask_BL[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


@dataclasses.dataclass
class FinetuneConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 1  # examples per micro-batch
    seq_len: int = 1024
    lr: float = 1e-4
    warmup_steps: int | None = None  # default: 10% of steps (at least 1)
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    lora_rank: int = 8  # 0 = full fine-tuning of the dense parameters
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    remat: bool = False  # recompute each block in the backward pass (activation memory of one block)
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    reasoning_effort: str = "medium"

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Type and range of every setting (ValueError naming it); run before anything loads or trains."""
        from .config import check_value
        from .harmony import REASONING_EFFORTS
        from .sampling import validate_seed

        rules = {"steps": ("int", 1), "batch_size": ("int", 1), "seq_len": ("int", 2), "lr": ("real>", 0.0),
                 "end_lr_fraction": ("real>=", 0.0), "weight_decay": ("real>=", 0.0), "clip_norm": ("real>", 0.0),
                 "grad_accum": ("int", 1), "lora_rank": ("int", 0), "save_every": ("int", 1), "keep": ("int", 1)}
        for name, rule in rules.items():
            setattr(self, name, check_value(name, getattr(self, name), rule))
        if self.end_lr_fraction > 1:
            raise ValueError(f"end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")
        if self.warmup_steps is not None:
            self.warmup_steps = check_value("warmup_steps", self.warmup_steps, ("int", 0))
        if self.lora_alpha is not None:
            self.lora_alpha = check_value("lora_alpha", self.lora_alpha, ("real>", 0.0))
        if self.lora_rank > 0:
            lora_lib._targets(self.lora_targets)  # a non-empty subset of the known targets
        if not isinstance(self.remat, bool):
            raise ValueError(f"remat must be a bool, got {self.remat!r}")
        validate_seed(self.seed)
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {self.reasoning_effort!r}")

    def schedule(self):
        warmup = max(1, self.steps // 10) if self.warmup_steps is None else self.warmup_steps
        warmup = min(warmup, max(self.steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(0.0, self.lr, warmup, max(self.steps, warmup + 1),
                                                  self.lr * self.end_lr_fraction)

    def optimizer(self) -> optax.GradientTransformation:
        tx = optax.chain(optax.clip_by_global_norm(self.clip_norm),
                         optax.adamw(self.schedule(), weight_decay=self.weight_decay, mu_dtype=jnp.float32))
        return optax.MultiSteps(tx, every_k_schedule=self.grad_accum) if self.grad_accum > 1 else tx

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
def _flat_arrays(state) -> dict[str, jax.Array]:
    return {flat_key(param_path(k)): (v.get_value() if hasattr(v, "get_value") else v.value)
            for k, v in nnx.to_flat_state(state)}


def _load_flat(node, filt, arrays: dict[str, Any]):
    state = nnx.state(node, filt) if filt is not None else nnx.state(node)
    flat = []
    for k, v in nnx.to_flat_state(state):
        key = flat_key(param_path(k))
        if key not in arrays:
            raise CheckpointError(f"training checkpoint lacks {key}")
        flat.append((k, v.replace(arrays[key])))
    nnx.update(node, nnx.from_flat_state(flat))


def _abstract(arrays: dict[str, jax.Array]):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in arrays.items()}


def _replicate_on(model, mesh):
    """Put every array of `model` (a module or an optimizer) not already placed on `mesh` there,
    replicated."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, rep)

    nnx.update(model, jax.tree.map(place, nnx.state(model)))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: nothing of that state is saved or exported."""


def check_dataset_ids(dataset: Dataset, vocab_size: int):
    """Every token id of the data (padding included) must be in the model's vocabulary: an id past it
    reads no embedding row and trains to NaN."""
    top = int(dataset.ids.max(initial=0))
    if top >= vocab_size or int(dataset.ids.min(initial=0)) < 0:
        raise ValueError(f"the training data holds token id {top} but the model's vocabulary has {vocab_size} "
                         "tokens (harmony's special tokens need the o200k_harmony vocabulary of 201088)")


def base_fingerprint(model, cfg: FinetuneConfig) -> str | None:
    """blake2b of the base weights the run changes, bit for bit (LoRA: the adapted projections; full
    fine-tuning: every dense parameter); None when they are not all on this process."""
    import hashlib

    if cfg.lora_rank > 0:
        targets = lora_lib._targets(cfg.lora_targets)
        arrays = [(f"{i}.{t}", getattr(getattr(b, lora_lib._WEIGHTS[t][0]), lora_lib._WEIGHTS[t][1])[...])
                  for i, b in enumerate(model.blocks) for t in targets]
    else:
        arrays = [(flat_key(param_path(k)), v.get_value() if hasattr(v, "get_value") else v.value)
                  for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    if not all(getattr(a, "is_fully_addressable", True) for _, a in arrays):
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, a in arrays:
        host = np.ascontiguousarray(jax.device_get(a))
        h.update(f"{name}:{host.dtype}:{host.shape};".encode())
        h.update(memoryview(host.reshape(-1).view(np.uint8)))
    return h.hexdigest()


def train_step(model, optimizer, ids, mask, wrt, remat: bool = False):
    """One micro-batch: the loss, its gradient w.r.t. the `wrt` variables, the optimizer update (in
    place). The Trainer jits it; `gptoss-jax aot --program finetune` lowers it for a target."""
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))
    loss, grads = grad_fn(model, ids, mask, remat)
    optimizer.update(model, grads)
    return loss


_train_step = nnx.jit(train_step, static_argnames=("wrt", "remat"))


def make_trainable(model, cfg: "FinetuneConfig"):
    """Prepare `model` (in place) for the run `cfg` describes and return what trains (`wrt`): LoRA
    adapters attached (rank > 0), or the dense parameters upcast to float32 master weights (rank 0)."""
    if cfg.lora_rank > 0:
        if not lora_lib.has_lora(model):
            lora_lib.apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                                seed=cfg.seed)
        return lora_lib.LoRAParam
    if lora_lib.has_lora(model):
        raise ValueError("full fine-tuning (lora_rank 0) of a model that has LoRA adapters")
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                                   else x, nnx.state(model, nnx.Param)))
    return nnx.Param


class Trainer:
    """Owns the model being trained, its optimizer, the data stream and the checkpoint manager.

    `model` is changed in place: LoRA adapters are attached (rank > 0), or the dense parameters are
    upcast to float32 (rank 0). With `mesh` (a `jax.sharding.Mesh` with a "data" axis; default: the
    mesh of a model loaded with `load_model(..., mesh=)`) batches are split over "data" (data
    parallel); parameters keep their sharding on that mesh (expert / model parallel as loaded), the
    others and the adapters are replicated.
    """

    def __init__(self, model, dataset: Dataset, cfg: FinetuneConfig, *, out_dir: str | None = None,
                 mesh=None, base_model: str | None = None):
        cfg.validate()
        check_dataset_ids(dataset, model.config.vocab_size)
        mesh = mesh if mesh is not None else model.runtime.mesh  # load_model(..., mesh=)
        self.model, self.dataset, self.cfg, self.mesh = model, dataset, cfg, mesh
        self.out_dir, self.base_model = out_dir, base_model
        # the base weights this run changes, hashed before it changes anything (resume checks them)
        self.base_fingerprint = base_fingerprint(model, cfg) if out_dir is not None else None
        if mesh is not None:
            if "data" not in mesh.axis_names:
                raise ValueError(f"the mesh needs a 'data' axis for data parallelism, has {mesh.axis_names}")
            n = mesh.shape["data"]
            if cfg.batch_size % n:
                raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the data axis ({n})")
            _replicate_on(model, mesh)
        self.wrt = make_trainable(model, cfg)
        self.optimizer = nnx.Optimizer(model, cfg.optimizer(), wrt=self.wrt)
        if mesh is not None:  # the step count too (a restored one would otherwise sit on one device)
            _replicate_on(self.optimizer, mesh)
        self.rng = jax.random.key(cfg.seed)
        self.step = 0  # optimizer steps done
        self.micro_step = 0
        self.losses: list[float] = []
        self._manager = None
        if mesh is not None:
            self._batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
        else:
            self._batch_sharding = None

    # ---- data ------------------------------------------------------------------------------
    def _batch(self):
        idx = self.dataset.indices(self.micro_step * self.cfg.batch_size, self.cfg.batch_size, self.rng)
        ids, mask = self.dataset.ids[idx], self.dataset.mask[idx]
        if self._batch_sharding is not None:
            return jax.device_put(ids, self._batch_sharding), jax.device_put(mask, self._batch_sharding)
        return jnp.asarray(ids), jnp.asarray(mask)

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> float:
        """grad_accum micro-batches -> one optimizer update; returns their mean loss."""
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            ids, mask = self._batch()
            total += float(_train_step(self.model, self.optimizer, ids, mask, self.wrt, self.cfg.remat))
            self.micro_step += 1
        loss = total / self.cfg.grad_accum
        if not np.isfinite(loss):
            raise TrainingDiverged(f"step {self.step + 1}: the loss is {loss} (learning rate too high, or "
                                     "bad data?); stopped without saving or exporting this state")
        self.step += 1
        self.losses.append(loss)
        return loss

    # ---- checkpoints -----------------------------------------------------------------------
    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            if self.out_dir is None:
                raise ValueError("no out_dir: the trainer cannot save checkpoints")
            opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep, save_interval_steps=self.cfg.save_every,
                                                enable_async_checkpointing=True, create=True)
            self._manager = ocp.CheckpointManager(os.path.abspath(os.path.join(self.out_dir, TRAIN_STATE_DIR)),
                                                  options=opts, item_names=("params", "opt", "meta"))
        return self._manager

    def _meta(self):
        return {"step": self.step, "micro_step": self.micro_step,
                "data_position": self.micro_step * self.cfg.batch_size,
                "rng": [int(x) for x in np.asarray(jax.random.key_data(self.rng)).reshape(-1)],
                "losses": self.losses, "config": self.cfg.to_dict(), "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint,
                "lora": lora_lib.lora_info(self.model), "time": time.time()}

    def save(self, force: bool = False) -> bool:
        """Save (asynchronously) if the step is due (every `save_every`) or `force`."""
        import orbax.checkpoint as ocp

        if not force and self.step % self.cfg.save_every:
            return False
        if self.step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(params=ocp.args.StandardSave(_flat_arrays(nnx.state(self.model, self.wrt))),
                                  opt=ocp.args.StandardSave(_flat_arrays(nnx.state(self.optimizer))),
                                  meta=ocp.args.JsonSave(self._meta()))
        return self.manager.save(self.step, args=args, force=True)

    def restore(self, step: int | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; False when there is none."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step() if step is None else step
        if step is None:
            return False
        params_t = _abstract(_flat_arrays(nnx.state(self.model, self.wrt)))
        opt_t = _abstract(_flat_arrays(nnx.state(self.optimizer)))
        r = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(params_t),
                                                               opt=ocp.args.StandardRestore(opt_t),
                                                               meta=ocp.args.JsonRestore()))
        meta = r["meta"]
        free = ("steps", "save_every", "keep", "remat")  # may change between runs (remat: same math)
        saved = {k: v for k, v in meta["config"].items() if k not in free}
        now = {k: v for k, v in self.cfg.to_dict().items() if k not in free}
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now) if saved.get(k) != now.get(k)}
            raise ValueError(f"cannot resume: the checkpoint was trained with other settings (saved, now): {diff}")
        saved_fp = meta.get("base_fingerprint")
        if saved_fp is not None and self.base_fingerprint is not None and saved_fp != self.base_fingerprint:
            raise ValueError(f"cannot resume: the base model's weights are not those the run started from "
                             f"({meta.get('base_model') or 'a model object'}); resuming would apply the adapters "
                             "to other weights (an export merged into the base?). Pass the original --model")
        _load_flat(self.model, self.wrt, r["params"])
        _load_flat(self.optimizer, None, r["opt"])
        self.step, self.micro_step = int(meta["step"]), int(meta["micro_step"])
        self.losses = [float(x) for x in meta["losses"]]
        self.rng = jax.random.wrap_key_data(jnp.asarray(np.asarray(meta["rng"], np.uint32)))
        return True

    def saved_any(self) -> bool:
        """Whether out_dir/train_state holds a checkpoint."""
        state_dir = os.path.join(self.out_dir, TRAIN_STATE_DIR) if self.out_dir else None
        return bool(state_dir and os.path.isdir(state_dir) and any(e.isdigit() for e in os.listdir(state_dir)))

    def wait(self):
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self):
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    # ---- loop ------------------------------------------------------------------------------
    def run(self, *, until: int | None = None, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """Train to `until` (default cfg.steps) optimizer steps, saving as configured; returns the
        losses of the steps run now."""
        from tqdm.auto import tqdm

        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        new = []
        with tqdm(total=self.cfg.steps, initial=self.step, desc="fine-tuning", disable=not progress,
                  unit="step") as bar:
            while self.step < until:
                loss = self.train_step()
                new.append(loss)
                lr = float(self.cfg.schedule()(self.step - 1))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if on_step is not None:
                    on_step(self.step, loss)
                if self.out_dir is not None:
                    self.save(force=self.step == self.cfg.steps)
        return new

    # ---- export ----------------------------------------------------------------------------
    def merged_model(self):
        return merged_copy(self.model)


def merged_copy(model):
    """A model with the adapters folded in; shares every non-adapted array with `model` (no copy of
    the frozen experts), `model` itself keeps its adapters."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # new Variable objects around the same arrays
    return lora_lib.merge_lora(nnx.merge(graphdef, state))


_EXPORT_FILES = ("config.json", "generation_config.json", HF_INDEX)
MANIFEST_FORMAT = "gptoss-jax-finetune-v1"


def export_names(cfg) -> list[str]:
    """The files `export_hf` writes for a model of config `cfg`."""
    shards = release_shards(cfg, "hf", tensor_specs(cfg, "hf"))
    return [fn for fn, _ in shards] + ["config.json", "generation_config.json"] + ([HF_INDEX] if len(shards) > 1 else [])


def read_manifest(out_dir: str) -> dict | None:
    p = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(p):
        return None
    m = read_json_object(p, "the fine-tuning run's manifest")
    if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("exported", []), list):
        raise CheckpointError(f"{p}: not a gptoss-jax fine-tuning manifest")
    return m


def _write_manifest(out_dir: str, manifest: dict):
    tmp = os.path.join(out_dir, f".{MANIFEST}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, **manifest}, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def _owned_exports(out_dir: str) -> set[str]:
    """The files an earlier export of this run wrote (its manifest); a folder of an older version
    (train_state/ but no manifest): its export-named files, as that version assumed."""
    m = read_manifest(out_dir)
    if m is not None:
        return set(m.get("exported", []))
    if os.path.isdir(os.path.join(out_dir, TRAIN_STATE_DIR)):
        return {f for f in os.listdir(out_dir) if f.endswith(".safetensors") or f in _EXPORT_FILES}
    return set()


def _check_export_clashes(out_dir: str, names) -> None:
    owned = _owned_exports(out_dir)
    clash = sorted(f for f in names if os.path.lexists(os.path.join(out_dir, f)) and f not in owned)
    if clash:
        raise FileExistsError(f"{out_dir} holds {', '.join(clash)}, which this run did not write: the export "
                              "would replace it; choose an empty or new folder")


def export_hf(model, out_dir: str, *, progress: bool = False) -> str:
    """Write `model` (adapters merged) in the Hugging Face layout into `out_dir`, next to what the run
    keeps there (train_state/, train_log.jsonl, its manifest): written to a temporary folder first, then
    moved in, replacing the files of an earlier export of the run (listed in its manifest) and nothing
    else; a file of that name the run did not write is refused (FileExistsError)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    owned = _owned_exports(out_dir)
    manifest = read_manifest(out_dir) or {}
    with scratch_dir(out_dir, "export") as tmp:
        written = os.path.join(tmp, "model")
        save_checkpoint(merged_copy(model) if lora_lib.has_lora(model) else model, written, layout="hf",
                        progress=progress)
        new = sorted(os.listdir(written))
        _check_export_clashes(out_dir, new)
        _write_manifest(out_dir, {**manifest, "exported": sorted(owned | set(new))})  # both, until moved
        for fn in sorted(owned - set(new)):  # an earlier export's files that this one does not have
            remove_path(os.path.join(out_dir, fn))
        for fn in sorted(new, key=lambda f: f == "config.json"):  # config.json last: the folder loads once it exists
            os.replace(os.path.join(written, fn), os.path.join(out_dir, fn))
        _write_manifest(out_dir, {**manifest, "exported": new})
    return out_dir


def check_out_dir(out_dir: str, base: str | None, resume: bool) -> None:
    """Before anything loads: `out_dir` must not be, hold or lie inside the base model's folder; a new
    run needs it absent or empty; resuming needs a folder a run wrote (its manifest or train_state/)."""
    if base is not None and os.path.exists(base) and same_or_nested(out_dir, base):
        raise ValueError(f"--out {out_dir} is the base model {base}, inside it or holds it: the export would "
                         "replace the base weights; choose another folder")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out {out_dir} exists and is not a folder")
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    state_dir = os.path.join(out_dir, TRAIN_STATE_DIR)
    if not resume and entries:
        if os.path.isdir(state_dir) and os.listdir(state_dir):
            raise FileExistsError(f"{state_dir} holds checkpoints: pass resume=True (--resume) or another folder")
        raise FileExistsError(f"--out {out_dir} is not empty ({', '.join(sorted(entries)[:3])}"
                              f"{', ...' if len(entries) > 3 else ''}): a new run writes into an empty or new "
                              "folder only")
    if resume and entries and MANIFEST not in entries and TRAIN_STATE_DIR not in entries:
        raise FileExistsError(f"--out {out_dir} was not written by a fine-tuning run (no {MANIFEST} or "
                              f"{TRAIN_STATE_DIR}/): nothing to resume, and a run would replace its files")


# ---------------------------------------------------------------------------------------------
# One call: load, train, checkpoint, export
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneResult:
    losses: list[float]  # every step's loss, from step 1 (restored ones included when resumed)
    new_losses: list[float]  # the steps run by this call
    step: int
    out_dir: str | None
    model: Any = dataclasses.field(repr=False, default=None)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def summary(self) -> dict:
        return {"first_loss": self.first_loss, "last_loss": self.last_loss, "steps": self.step,
                "steps_this_run": len(self.new_losses), "out": self.out_dir}


def finetune(model, data, cfg: FinetuneConfig | None = None, *, out_dir: str | None = None, resume: bool = False,
             mesh=None, export: bool = True, progress: bool = True, stop_after: int | None = None,
             dtype: str = "bfloat16", kernels: str = "auto", log: Callable[[int, float], None] | None = None
             ) -> FinetuneResult:
    """Fine-tune `model` (a GptOss, or a checkpoint path / Hub id for `load_model`) on `data` (a JSONL
    path, a list of examples, or a Dataset).

    out_dir: checkpoints go to out_dir/train_state (every cfg.save_every steps, the last cfg.keep kept,
        and at the end), the loss log to out_dir/train_log.jsonl, and (export=True) the merged model in
        the Hugging Face layout to out_dir itself, so `load_model(out_dir)` loads the result. A new run needs
        out_dir absent or empty and apart from the base model's folder (`check_out_dir`); the export
        replaces only the files of the run's earlier export (its manifest, gptoss_finetune.json).
    resume: continue from the latest checkpoint in out_dir/train_state (same settings, `steps` may grow;
        same base weights, checked by hash).
    stop_after: stop once this optimizer step is reached (as if interrupted; checkpointed, not exported).
    """
    cfg = cfg or FinetuneConfig()
    cfg.validate()
    base = None if hasattr(model, "forward") else os.fspath(model)
    if out_dir is not None:
        out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
        check_out_dir(out_dir, base, resume)
    if not isinstance(data, (Dataset, str, os.PathLike)):
        data = list(data)  # may be rendered twice

    def dataset(pad_id):
        if isinstance(data, (str, os.PathLike)):
            return Dataset.from_jsonl(os.fspath(data), cfg.seq_len, pad_id=pad_id, reasoning_effort=cfg.reasoning_effort)
        return Dataset.from_examples(data, cfg.seq_len, pad_id=pad_id, reasoning_effort=cfg.reasoning_effort)

    ds = data if isinstance(data, Dataset) else None
    if base is not None:
        from .api import load_model

        if ds is None:  # the data's errors before a long load (or download); padded with the usual id
            ds = dataset(_DEFAULT_PAD)
        model = load_model(base, dtype=dtype, kernels=kernels, progress=progress, mesh=mesh)
    if out_dir is not None:
        _check_export_clashes(out_dir, export_names(model.config))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else _DEFAULT_PAD
    if ds is None or (not isinstance(data, Dataset) and pad != _DEFAULT_PAD):
        ds = dataset(pad)
    data = ds
    trainer = Trainer(model, data, cfg, out_dir=out_dir, mesh=mesh, base_model=base)
    if resume and out_dir is not None and not trainer.restore():
        print(f"no checkpoint in {os.path.join(out_dir, TRAIN_STATE_DIR)}: starting from step 0")

    def on_step(step, loss):
        if out_dir is not None:
            with open(os.path.join(out_dir, LOG_FILE), "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": float(cfg.schedule()(step - 1))}) + "\n")
        if log is not None:
            log(step, loss)

    created = out_dir is not None and not os.path.exists(out_dir)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        if read_manifest(out_dir) is None:
            _write_manifest(out_dir, {"base_model": base, "exported": sorted(_owned_exports(out_dir))})
    try:
        new = trainer.run(until=stop_after, progress=progress, on_step=on_step)
        if out_dir is not None:
            trainer.save(force=True)
    except BaseException:
        trainer.close()
        # a folder this call made and holding no checkpoint is of no use: nothing of a failed run stays
        if created and not trainer.saved_any():
            remove_path(out_dir)
        raise
    trainer.close()
    if export and out_dir is not None and trainer.step >= cfg.steps:
        export_hf(trainer.model, out_dir)
    return FinetuneResult(list(trainer.losses), new, trainer.step, out_dir, trainer.model)
