"""o200k_harmony tokenizer against tiktoken's own o200k_base / o200k_harmony and openai-harmony's encoding."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from gptoss_jax import tokenizer as T

REPO = Path(__file__).resolve().parents[1]
VOCAB_DIR = REPO.parent / "shared" / "vocab"
VOCAB_FILE = VOCAB_DIR / "o200k_base.tiktoken"

TEXTS = [
    "",
    "hello world",
    "Hello, World! How's it going? I'm fine, they'll see; we'd've",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\nlines\r\nwindows\r\n\r\n\n\n\n",
    " " * 37 + "x" + "\n" * 9 + "\t" * 5 + "  \n  \n",
    "12345678901234567890123456789 3.14159265358979 -0.000001 1e-10 0x7fffffff 1,000,000",
    "中文测试：今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、カタカナとひらがな。한국어 텍스트도 있습니다.",
    "Русский текст с ёлками; Ελληνικά; עברית; العربية; हिन्दी; ไทย",
    "emoji 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303; zero-width\u200bjoiner\u200d; nbsp\u00a0here; bom\ufeff",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nclass A(B):\n\tpass\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT * FROM t WHERE a >= 10 AND b <> 'x'; -- sql\n<div class=\"c\">&amp;</div>",
    "URLs https://example.com/a/b?c=d&e=f#g and paths /usr/local/bin//x ../../y",
    "MiXeD CaSe WORDS ALLCAPS camelCaseIdentifiers snake_case_ids kebab-case-ids",
    "math: ∀x∈ℝ, ∃y: x²+y²≤1; ∫₀^∞ e^{-x} dx = 1; ≠ ≈ ∞ √2",
    "punctuation!!! ??? ... --- ___ *** ((( ))) [[[ ]]] {{{ }}} ''' \"\"\" ```",
    "text mentioning <|start|> and <|endoftext|> as plain text",
    "\x00\x01\x7f control chars \u2028 line sep \u2029 para sep",
]


@pytest.fixture(scope="session")
def tiktoken_registry(tmp_path_factory):
    """tiktoken's own registry (tiktoken_ext.openai_public) working offline: its download cache is
    pre-filled with the real file under the name tiktoken gives the official URL."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    shutil.copy(VOCAB_FILE, cache / hashlib.sha1(T.O200K_BASE_URL.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        base = tiktoken.get_encoding("o200k_base")
        harmony = tiktoken.get_encoding("o200k_harmony")
    return base, harmony


@pytest.fixture(scope="session")
def enc():
    return T.load_tokenizer(VOCAB_DIR)


@pytest.fixture(scope="session")
def harmony_enc():
    import openai_harmony as oh

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _random_texts(n=40, seed=0):
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        " \t\n\r",
        ".,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`",
        "的一是不了人我在有他这为之大来以个中上们",
        "あいうえおアイウエオ가나다라마",
        "αβγδεжзийкשלםمرحبا",
        "😀🎉👍🏽🚀🔥❤️",
    ]
    out = []
    for _ in range(n):
        k = rng.randrange(1, 200)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


def _token_texts(enc, n=3000, seed=1):
    """Text made of decoded random vocabulary entries (every kind of token the BPE knows)."""
    rng = random.Random(seed)
    ids = [rng.randrange(T.O200K_BASE_N_RANKS) for _ in range(n)]
    return [enc.decode(ids[i : i + 50], errors="replace") for i in range(0, n, 50)]


def test_vocab_file_is_the_official_one():
    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == T.O200K_BASE_SHA256


def test_encoding_shape_and_name(enc):
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == "o200k_harmony"
    assert enc.n_vocab == T.VOCAB_SIZE == 201088
    assert enc.max_token_value == 201087
    assert enc.eot_token == T.ENDOFTEXT == 199999


def test_same_ranks_and_regex_as_tiktoken_o200k_base(enc, tiktoken_registry):
    base, _ = tiktoken_registry
    assert enc._mergeable_ranks == base._mergeable_ranks
    assert enc._pat_str == base._pat_str


def test_encode_equals_tiktoken_o200k_base(enc, tiktoken_registry):
    base, _ = tiktoken_registry
    texts = TEXTS + _random_texts() + _token_texts(base)
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == base.encode_ordinary(text), text
        assert enc.decode(ids) == text
        assert enc.decode_bytes(ids) == text.encode("utf-8")
    # Special-token text is refused by default and encoded as plain text when allowed as such.
    with pytest.raises(ValueError):
        enc.encode("x <|start|> y")
    plain = "x <|start|> y <|endoftext|>"
    assert enc.encode(plain, disallowed_special=()) == base.encode(plain, disallowed_special=())


def test_batch_encode_matches(enc, tiktoken_registry):
    base, _ = tiktoken_registry
    assert enc.encode_ordinary_batch(TEXTS) == base.encode_ordinary_batch(TEXTS)


def test_named_special_token_ids(enc):
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|reserved_200000|>": 200000,
        "<|reserved_200001|>": 200001,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|reserved_200004|>": 200004,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|reserved_200009|>": 200009,
        "<|reserved_200010|>": 200010,
        "<|reserved_200011|>": 200011,
        "<|call|>": 200012,
        "<|reserved_200013|>": 200013,
        "<|reserved_200018|>": 200018,
        "<|reserved_201087|>": 201087,
    }
    for s, i in expected.items():
        assert enc.encode(s, allowed_special="all") == [i], s
        assert enc.decode([i]) == s
        assert enc.encode_single_token(s) == i
    constants = {
        T.STARTOFTEXT: "<|startoftext|>", T.ENDOFTEXT: "<|endoftext|>", T.RETURN: "<|return|>",
        T.CONSTRAIN: "<|constrain|>", T.CHANNEL: "<|channel|>", T.START: "<|start|>", T.END: "<|end|>",
        T.MESSAGE: "<|message|>", T.CALL: "<|call|>",
    }
    for i, s in constants.items():
        assert enc.decode([i]) == s
    assert T.DEFAULT_STOP_TOKEN_IDS == (200002, 199999, 200012)
    specials = T.harmony_special_tokens()
    assert len(specials) == 201088 - 199998
    assert sorted(specials.values()) == list(range(199998, 201088))
    assert enc.special_tokens_set == set(specials)


def test_special_tokens_agree_with_tiktoken_o200k_harmony(enc, tiktoken_registry):
    _, ref = tiktoken_registry
    assert ref.n_vocab == enc.n_vocab
    assert ref._mergeable_ranks == enc._mergeable_ranks
    ours = T.harmony_special_tokens()
    theirs = dict(ref._special_tokens)
    # tiktoken also keeps o200k_base's <|endofprompt|> as a second name of id 200018 (= <|reserved_200018|>).
    assert theirs.pop("<|endofprompt|>") == 200018
    assert ours == theirs
    text = "<|start|>user<|message|>Hi there<|end|><|start|>assistant<|channel|>final<|message|>Yo<|return|>"
    assert enc.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    for text in TEXTS:
        assert enc.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())


def test_ids_agree_with_openai_harmony(enc, harmony_enc):
    theirs = {s: harmony_enc.encode(s, allowed_special="all") for s in harmony_enc.special_tokens_set}
    assert all(len(v) == 1 for v in theirs.values())
    theirs = {s: v[0] for s, v in theirs.items()}
    # openai-harmony also names id 201088, outside the model's 201088-entry embedding.
    assert theirs.pop("<|reserved_201088|>") == 201088
    assert theirs == T.harmony_special_tokens()
    ids = list(range(199990, 201088))
    assert enc.decode(ids) == harmony_enc.decode(ids)
    assert sorted(harmony_enc.stop_tokens()) == sorted({T.RETURN, T.END, T.CALL})
    for text in TEXTS + _random_texts(10, seed=3):
        assert enc.encode_ordinary(text) == harmony_enc.encode(text, disallowed_special=())


def test_cached_and_env_var(monkeypatch):
    first = T.load_tokenizer(VOCAB_DIR)
    assert T.load_tokenizer(str(VOCAB_DIR)) is first
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))
    assert T.load_tokenizer() is first
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR) + "/")
    assert T.load_tokenizer() is first


def test_missing_file_error(tmp_path, monkeypatch):
    with pytest.raises(T.TokenizerLoadError, match="o200k_base.tiktoken not found") as ei:
        T.load_tokenizer(tmp_path)
    assert str(tmp_path) in str(ei.value) and "TIKTOKEN_ENCODINGS_BASE" in str(ei.value)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "nope"))
    with pytest.raises(T.TokenizerLoadError, match="not found"):
        T.load_tokenizer()


def test_hash_mismatch_error(tmp_path):
    data = bytearray(VOCAB_FILE.read_bytes())
    data[100] = ord("A") if data[100] != ord("A") else ord("B")  # one changed byte
    (tmp_path / "o200k_base.tiktoken").write_bytes(bytes(data))
    with pytest.raises(T.TokenizerLoadError, match="sha256 mismatch") as ei:
        T.load_tokenizer(tmp_path)
    assert T.O200K_BASE_SHA256 in str(ei.value)


def _no_local(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    T.load_tokenizer.cache_clear()
    return cache


def test_download_path_uses_official_url_hash_and_cache(monkeypatch, tmp_path, enc):
    cache = _no_local(monkeypatch, tmp_path)
    calls = []

    def fake_read_file(url):
        calls.append(url)
        return VOCAB_FILE.read_bytes()

    monkeypatch.setattr(tiktoken.load, "read_file", fake_read_file)
    try:
        got = T.load_tokenizer()
        assert calls == [T.O200K_BASE_URL]
        assert got._mergeable_ranks == enc._mergeable_ranks
        assert got._special_tokens == enc._special_tokens
        assert T.load_tokenizer() is got  # cached Encoding
        assert (cache / hashlib.sha1(T.O200K_BASE_URL.encode()).hexdigest()).is_file()  # tiktoken's cache
        T.load_tokenizer.cache_clear()
        T.load_tokenizer()
        assert calls == [T.O200K_BASE_URL]  # second load: from tiktoken's cache, no download
    finally:
        T.load_tokenizer.cache_clear()


def test_offline_error_says_to_set_env(monkeypatch, tmp_path):
    import requests

    _no_local(monkeypatch, tmp_path)

    def offline(url):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    try:
        with pytest.raises(T.TokenizerLoadError, match="TIKTOKEN_ENCODINGS_BASE") as ei:
            T.load_tokenizer()
        assert T.O200K_BASE_URL in str(ei.value)
    finally:
        T.load_tokenizer.cache_clear()


def test_corrupt_download_error(monkeypatch, tmp_path):
    _no_local(monkeypatch, tmp_path)
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: b"bm90IGEgdm9jYWI= 0\n")
    try:
        with pytest.raises(T.TokenizerLoadError, match="hash"):
            T.load_tokenizer()
    finally:
        T.load_tokenizer.cache_clear()


def test_env_var_is_read_at_call_time(monkeypatch, tmp_path):
    # An env var pointing elsewhere is honoured (not masked by an earlier cached load).
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", os.fspath(tmp_path))
    with pytest.raises(T.TokenizerLoadError):
        T.load_tokenizer()
