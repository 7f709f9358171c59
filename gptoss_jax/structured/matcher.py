"""The host side of constrained decoding: llguidance matchers and the packed token masks.

The llguidance tokenizer is built once from our o200k_harmony encoding (`tokenizer.load_tokenizer`),
so harmony's special tokens (<|channel|>, <|message|>, <|constrain|>, <|call|>, ...) can be named in
grammars. Its size is the model's vocabulary: ids beyond the encoding never get a bit.

A mask row is `ceil(V / 32)` int32 words, token t allowed when bit t % 32 of word t // 32 is set
(llguidance's layout); -1 everywhere allows every token (unconstrained slots).
"""

from __future__ import annotations

import collections
import functools
import threading

import llguidance
import llguidance.numpy
import llguidance.tiktoken
import numpy as np

from .. import tokenizer as tk
from .grammar import Grammar

__all__ = ["mask_words", "ll_tokenizer", "check_vocab", "validate_grammar", "Constraint", "MaskBatch",
           "ConstraintError"]

TEMPLATES = 64  # compiled grammars kept (a new request of a known grammar copies one: no compile)


class ConstraintError(RuntimeError):
    """A matcher refused a token the mask allowed, or llguidance failed (a bug, not bad input)."""


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def check_vocab(vocab_size: int) -> None:
    """Constrained decoding reads the o200k_harmony vocabulary: the model must cover its ids."""
    if vocab_size < tk.VOCAB_SIZE:
        raise ValueError(f"constrained decoding needs the o200k_harmony vocabulary ({tk.VOCAB_SIZE} ids); this "
                         f"model has {vocab_size}")


@functools.lru_cache(maxsize=2)
def ll_tokenizer(vocab_size: int):
    """llguidance's tokenizer over o200k_harmony with `vocab_size` ids (built once: ~1 s)."""
    check_vocab(vocab_size)
    # EOS: <|endoftext|>, a token our grammars never name, so <|return|> / <|call|> stay plain specials
    return llguidance.tiktoken.lltokenizer_from_encoding(tk.load_tokenizer(), n_vocab=vocab_size,
                                                          eos_token=tk.ENDOFTEXT)


_lock = threading.Lock()
_templates: collections.OrderedDict = collections.OrderedDict()


def _template(lark: str, vocab_size: int):
    """A fresh matcher of `lark` (compiled once, then copied); ValueError with llguidance's message."""
    key = (lark, vocab_size)
    with _lock:
        m = _templates.get(key)
        if m is not None:
            _templates.move_to_end(key)
            return m
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    m = llguidance.LLMatcher(ll_tokenizer(vocab_size), grammar, log_level=0)
    if m.is_error():
        raise ValueError(f"the grammar does not compile: {m.get_error()}")
    with _lock:
        _templates[key] = m
        while len(_templates) > TEMPLATES:
            _templates.popitem(last=False)
    return m


def validate_grammar(g: Grammar, vocab_size: int) -> None:
    """Compile `g` (cached) so that a bad grammar is refused when the request comes."""
    _template(g.lark, vocab_size)


class Constraint:
    """One request's matcher: `fill(row)` writes the allowed tokens, `advance(token)` consumes one."""

    def __init__(self, grammar: Grammar, vocab_size: int):
        self.grammar = grammar
        self.matcher = _template(grammar.lark, vocab_size).deep_copy()
        self.words = mask_words(vocab_size)

    def fill(self, row: np.ndarray) -> None:
        llguidance.numpy.fill_next_token_bitmask(self.matcher, row.reshape(1, -1))

    def initial_mask(self) -> np.ndarray:
        row = np.zeros((1, self.words), np.int32)
        self.fill(row)
        return row

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


class MaskBatch:
    """The [max_seqs, ceil(V / 32)] int32 masks of a decode step: constrained rows from their
    matchers (computed in parallel by llguidance's thread pool), the others all allowed."""

    def __init__(self, max_seqs: int, vocab_size: int):
        self.masks = np.full((max_seqs, mask_words(vocab_size)), -1, np.int32)
        self._executor = None
        self._constrained: list[int] = []

    def fill(self, constraints: dict[int, Constraint]) -> np.ndarray:
        self.masks[self._constrained] = -1  # rows constrained last step, freed or not
        self._constrained = sorted(constraints)
        if constraints:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(c.matcher, s) for s, c in constraints.items()],
                                                         self.masks)
        return self.masks
