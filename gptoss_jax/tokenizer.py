"""The gpt-oss tokenizer: ``o200k_harmony`` as a :class:`tiktoken.Encoding`.

``o200k_harmony`` is OpenAI's ``o200k_base`` BPE (199,998 mergeable ranks, same split regex) plus the
harmony special tokens at ids 199,998 .. 201,087, so the vocabulary has exactly the model's
``vocab_size`` of 201,088 ids::

    199998 <|startoftext|>      200005 <|channel|>      200012 <|call|>
    199999 <|endoftext|>        200006 <|start|>        every other id in 200000 .. 201087:
    200002 <|return|>           200007 <|end|>          <|reserved_N|>
    200003 <|constrain|>        200008 <|message|>

This is the table of openai-harmony's ``HarmonyGptOss`` encoding (one name per id) truncated at the model's
vocabulary: tiktoken's own ``o200k_harmony`` agrees on every id but also keeps o200k_base's
``<|endofprompt|>`` as a second name for 200018, and openai-harmony also names id 201088, which is outside
the model's embedding; neither is kept here.

Loading the BPE ranks (``o200k_base.tiktoken``):

* ``TIKTOKEN_ENCODINGS_BASE`` set (or ``encodings_base=`` given): the file ``o200k_base.tiktoken`` in that
  folder, checked against its sha256. This is the same variable and file name that openai-harmony uses, so
  one setting serves both; it is the way to run offline.
* otherwise: tiktoken's own download and cache (``tiktoken.load.load_tiktoken_bpe`` with the official URL
  and hash; cached under ``TIKTOKEN_CACHE_DIR``, by default ``$TMPDIR/data-gym-cache``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path

import tiktoken
import tiktoken.load

__all__ = [
    "ENCODING_NAME",
    "ENCODINGS_BASE_ENV",
    "O200K_BASE_FILENAME",
    "O200K_BASE_URL",
    "O200K_BASE_SHA256",
    "O200K_BASE_N_RANKS",
    "VOCAB_SIZE",
    "STARTOFTEXT",
    "ENDOFTEXT",
    "RETURN",
    "CONSTRAIN",
    "CHANNEL",
    "START",
    "END",
    "MESSAGE",
    "CALL",
    "DEFAULT_STOP_TOKEN_IDS",
    "PAD_TOKEN_ID",
    "TokenizerLoadError",
    "harmony_special_tokens",
    "o200k_pattern",
    "load_o200k_base_ranks",
    "build_encoding",
    "load_tokenizer",
]

ENCODING_NAME = "o200k_harmony"
ENCODINGS_BASE_ENV = "TIKTOKEN_ENCODINGS_BASE"
O200K_BASE_FILENAME = "o200k_base.tiktoken"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_N_RANKS = 199_998
VOCAB_SIZE = 201_088  # config.json vocab_size of gpt-oss-20b and gpt-oss-120b

# Named special-token ids.
STARTOFTEXT = 199_998  # <|startoftext|>  (bos_token_id)
ENDOFTEXT = 199_999  # <|endoftext|>    (pad_token_id)
RETURN = 200_002  # <|return|>       end of the assistant's final answer
CONSTRAIN = 200_003  # <|constrain|>    content type of a tool call, e.g. "<|constrain|>json"
CHANNEL = 200_005  # <|channel|>
START = 200_006  # <|start|>
END = 200_007  # <|end|>
MESSAGE = 200_008  # <|message|>
CALL = 200_012  # <|call|>         end of a tool call
PAD_TOKEN_ID = ENDOFTEXT
# The eos_token_id list of the released generation_config.json: <|return|>, <|endoftext|>, <|call|>.
DEFAULT_STOP_TOKEN_IDS: tuple[int, ...] = (RETURN, ENDOFTEXT, CALL)

_NAMED_SPECIALS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}


class TokenizerLoadError(RuntimeError):
    """The o200k_base ranks could not be loaded (missing file, hash mismatch, no network)."""


def harmony_special_tokens() -> dict[str, int]:
    """All special tokens of o200k_harmony, name -> id, for ids 199998 .. 201087 (one name per id)."""
    by_id = {i: f"<|reserved_{i}|>" for i in range(O200K_BASE_N_RANKS + 2, VOCAB_SIZE)}
    by_id.update({i: s for s, i in _NAMED_SPECIALS.items()})
    return {s: i for i, s in sorted(by_id.items())}


def o200k_pattern() -> str:
    """The o200k_base pre-tokenisation regex (identical to tiktoken_ext.openai_public's)."""
    return "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    )


def _parse_tiktoken_bpe(contents: bytes) -> dict[bytes, int]:
    # Same format and parsing as tiktoken.load.load_tiktoken_bpe: "<base64 token> <rank>" per line.
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in contents.splitlines() if line)
    }


def _resolve_base(encodings_base: str | os.PathLike | None) -> str | None:
    if encodings_base is not None:
        return os.fspath(encodings_base)
    env = os.environ.get(ENCODINGS_BASE_ENV)
    return env if env else None


def load_o200k_base_ranks(encodings_base: str | os.PathLike | None = None) -> dict[bytes, int]:
    """The o200k_base mergeable ranks, from ``encodings_base`` / ``$TIKTOKEN_ENCODINGS_BASE`` or tiktoken's
    download cache (see the module docstring). Raises :class:`TokenizerLoadError` with a clear message."""
    base = _resolve_base(encodings_base)
    if base is not None:
        path = Path(base) / O200K_BASE_FILENAME
        if not path.is_file():
            raise TokenizerLoadError(
                f"{O200K_BASE_FILENAME} not found in {base!r} (from {ENCODINGS_BASE_ENV} or encodings_base=): "
                f"expected the file {str(path)!r}. Put o200k_base.tiktoken (sha256 {O200K_BASE_SHA256}, "
                f"from {O200K_BASE_URL}) there, or unset {ENCODINGS_BASE_ENV} to download it."
            )
        contents = path.read_bytes()
        digest = hashlib.sha256(contents).hexdigest()
        if digest != O200K_BASE_SHA256:
            raise TokenizerLoadError(
                f"sha256 mismatch for {str(path)!r}: got {digest}, expected {O200K_BASE_SHA256}. "
                f"The file is not OpenAI's o200k_base.tiktoken (corrupt or a different vocabulary); "
                f"replace it with a fresh copy of {O200K_BASE_URL}."
            )
        ranks = _parse_tiktoken_bpe(contents)
    else:
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(O200K_BASE_URL, expected_hash=O200K_BASE_SHA256)
        except ValueError as e:  # tiktoken's hash check of the downloaded file
            raise TokenizerLoadError(f"downloaded o200k_base.tiktoken failed its hash check: {e}") from e
        except Exception as e:  # no network, proxy, HTTP error, unwritable cache, ...
            raise TokenizerLoadError(
                f"could not download {O200K_BASE_URL} ({type(e).__name__}: {e}). When offline, set "
                f"{ENCODINGS_BASE_ENV} to a folder that holds {O200K_BASE_FILENAME} "
                f"(sha256 {O200K_BASE_SHA256}); openai-harmony reads the same variable."
            ) from e
    if len(ranks) != O200K_BASE_N_RANKS:
        raise TokenizerLoadError(f"o200k_base has {len(ranks)} ranks, expected {O200K_BASE_N_RANKS}")
    return ranks


def build_encoding(mergeable_ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """The o200k_harmony :class:`tiktoken.Encoding` from o200k_base ranks."""
    return tiktoken.Encoding(
        ENCODING_NAME,
        pat_str=o200k_pattern(),
        mergeable_ranks=mergeable_ranks,
        special_tokens=harmony_special_tokens(),
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.lru_cache(maxsize=4)
def _load_cached(base: str | None) -> tiktoken.Encoding:
    return build_encoding(load_o200k_base_ranks(base))


def load_tokenizer(encodings_base: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The gpt-oss tokenizer (o200k_harmony), cached per source folder.

    ``encodings_base``: folder holding ``o200k_base.tiktoken``; defaults to ``$TIKTOKEN_ENCODINGS_BASE``, and
    without either the file comes from tiktoken's download cache.

    Special tokens are plain text unless allowed: ``enc.encode(text, allowed_special="all")`` to parse
    ``<|start|>`` and friends in ``text``; ``enc.decode(ids)`` writes them back.
    """
    base = _resolve_base(encodings_base)
    if base is not None:
        base = str(Path(base).resolve())
    return _load_cached(base)


load_tokenizer.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]
