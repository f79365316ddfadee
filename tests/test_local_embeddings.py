"""The local embedding model (ubc/gateway/local.py) against fp32 reference vectors.

tests/testdata/minilm_reference.json holds all-MiniLM-L6-v2 vectors computed once from
the fp32 weights by sentence-transformers on PyTorch (scripts/make_minilm_reference.py);
the model under test is the int8 ONNX export on onnxruntime, with no PyTorch.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from ubc.gateway.local import (
    DIMENSIONS,
    MAX_TOKENS,
    MODEL_ID,
    TOKENIZER_PATH,
    VOCAB_SIZE,
    DimensionsNotSupportedError,
    LocalEmbedder,
    decode_base64,
    encode_base64,
    encode_float_list,
    get_local_embedder,
    token_bound,
)

REFERENCE = Path(__file__).parent / "testdata" / "minilm_reference.json"


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def texts(reference: dict[str, Any]) -> list[str]:
    return [item["text"] for item in reference["items"]]


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    model = LocalEmbedder(batch_size=2)  # several batches even for the five references
    model.load()
    return model


def test_model_constants(embedder: LocalEmbedder, reference: dict[str, Any]) -> None:
    assert embedder.model_id == MODEL_ID == "all-minilm-l6-v2"
    assert embedder.dimensions == DIMENSIONS == 384
    assert embedder.max_tokens == MAX_TOKENS == reference["max_seq_length"] == 256
    assert embedder.loaded


def test_reference_covers_truncation_and_non_ascii(texts: list[str]) -> None:
    assert any(not t.isascii() for t in texts)
    assert any(len(t.split()) > 300 for t in texts)


def test_vectors_match_fp32_reference(
    embedder: LocalEmbedder, reference: dict[str, Any], texts: list[str]
) -> None:
    vectors, counts = embedder.embed(texts)
    assert vectors.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = np.array([item["embedding"] for item in reference["items"]], dtype=np.float64)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    cosines = (vectors.astype(np.float64) * expected).sum(axis=1)
    assert cosines.min() >= 0.99, cosines
    assert cosines.mean() >= 0.998, cosines
    assert counts == [item["token_count"] for item in reference["items"]]


def test_token_counts_are_the_tokenizers(
    embedder: LocalEmbedder, reference: dict[str, Any], texts: list[str]
) -> None:
    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    extra = ["", "hello", "Hello, World!", "naïve café", "東京", "🚀"]
    expected = [len(tokenizer.encode(t).ids) for t in texts + extra]
    assert embedder.count_tokens(texts + extra) == expected
    assert embedder.embed(texts + extra)[1] == expected
    # [CLS] and [SEP] are counted: an empty string is two tokens.
    assert embedder.count_tokens(["", "hello"]) == [2, 3]
    assert embedder.count_tokens([]) == []


def test_truncation_at_256_tokens(embedder: LocalEmbedder) -> None:
    words = " ".join(f"w{i}" for i in range(400))
    assert embedder.count_tokens([words, words + " and much more text after the cut"]) == [
        256,
        256,
    ]
    vectors, counts = embedder.embed([words, words + " and much more text after the cut"])
    assert counts == [256, 256]
    np.testing.assert_array_equal(vectors[0], vectors[1])
    # 254 words + [CLS] + [SEP] is exactly the limit; one word more is cut off again.
    exact = "a " * 254
    assert embedder.count_tokens([exact, exact + "b", "a " * 253]) == [256, 256, 255]


def test_batching_gives_the_same_vectors(embedder: LocalEmbedder, texts: list[str]) -> None:
    inputs = [*texts, "short", "", "a somewhat longer sentence about ledgers", texts[0]]
    batched, counts = embedder.embed(inputs)
    one_by_one = [embedder.embed([t]) for t in inputs]
    for row, (vectors, single_counts) in enumerate(one_by_one):
        assert single_counts == [counts[row]]
        np.testing.assert_allclose(batched[row], vectors[0], atol=1e-5)
    np.testing.assert_array_equal(batched[0], batched[-1])
    # One batch for all (padded to the longest), and a different order: same vectors.
    short = [t for t in inputs if len(t) < 500]
    wide = LocalEmbedder(batch_size=64)
    reordered = short[::-1]
    np.testing.assert_allclose(wide.embed(reordered)[0][::-1], embedder.embed(short)[0], atol=1e-5)


def test_empty_input_list(embedder: LocalEmbedder) -> None:
    vectors, counts = embedder.embed([])
    assert vectors.shape == (0, 384)
    assert counts == []


def test_inputs_must_be_strings(embedder: LocalEmbedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed(["ok", 42])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        embedder.count_tokens("one string, not a list")


def test_dimensions(embedder: LocalEmbedder) -> None:
    full, _ = embedder.embed(["dimensions"])
    same, _ = embedder.embed(["dimensions"], dimensions=384)
    np.testing.assert_array_equal(full, same)
    for bad in (1, 128, 256, 383, 385, 0, -1):
        with pytest.raises(DimensionsNotSupportedError, match="384") as info:
            embedder.embed(["dimensions"], dimensions=bad)
        assert info.value.param == "dimensions"
        assert isinstance(info.value, ValueError)


def test_base64_round_trip(embedder: LocalEmbedder) -> None:
    vectors, _ = embedder.embed(["base64", "round trip"])
    for vector in vectors:
        encoded = encode_base64(vector)
        raw = base64.b64decode(encoded)
        assert len(raw) == 4 * 384
        np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), vector)
        np.testing.assert_array_equal(decode_base64(encoded), vector)
    # Little-endian float32, standard alphabet with padding: as the OpenAI API sends it.
    assert encode_base64(np.array([1.0, -2.0], dtype=np.float32)) == "AACAPwAAAMA="
    assert encode_base64([0.5]) == "AAAAPw=="
    with pytest.raises(ValueError, match="float32"):
        decode_base64("AAAA")  # three bytes


def test_float_list(embedder: LocalEmbedder) -> None:
    vectors, _ = embedder.embed(["float list"])
    values = encode_float_list(vectors[0])
    assert len(values) == 384
    assert all(type(x) is float for x in values)
    np.testing.assert_array_equal(np.array(values, dtype=np.float32), vectors[0])
    assert json.loads(json.dumps(values)) == values


def test_concurrent_first_use_loads_once(texts: list[str]) -> None:
    model = LocalEmbedder()
    results: list[np.ndarray[Any, Any]] = []
    sessions: list[object] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            vectors, _ = model.embed(texts[:3])
            results.append(vectors)
            sessions.append(model._session)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    assert len({id(s) for s in sessions}) == 1
    for vectors in results[1:]:
        np.testing.assert_array_equal(vectors, results[0])


def test_shared_instance() -> None:
    assert get_local_embedder() is get_local_embedder()
    assert isinstance(get_local_embedder(), LocalEmbedder)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LocalEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="intra_op_threads"):
        LocalEmbedder(intra_op_threads=-1)
    assert not LocalEmbedder().loaded  # construction loads nothing


# -- the bound held before tokenizing, and long texts (issue 12) ----------------------------


def _plain_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(TOKENIZER_PATH))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def _code_points() -> list[str]:
    return [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]


def test_normalizing_never_makes_more_characters_than_utf8_bytes() -> None:
    """The lemma of token_bound: with WordPiece's tokens of at least one character each,
    a text's tokens are at most its UTF-8 bytes, plus [CLS] and [SEP]."""
    normalizer = _plain_tokenizer().normalizer
    assert normalizer is not None
    for char in _code_points():
        assert len(normalizer.normalize_str(char)) <= len(char.encode()), repr(char)


def _random_text(rng: random.Random, size: int) -> str:
    pieces = [
        "word",
        "Ünïcödé",
        "東京",
        "🚀",
        "İ",
        "ﬁ",
        "각",
        "ΐ",
        "\u0301",
        "[MASK]",
        "[UNK]",
        "!",
        "...",
        "x" * 120,
        "antidisestablishmentarianism",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u00a0",
        "\u3000",
        "\x00",
        "\ufffd",
        "\u200b",
    ]
    return "".join(rng.choice(pieces) for _ in range(size))


def test_token_bound_holds_for_random_texts(embedder: LocalEmbedder) -> None:
    rng = random.Random(12)
    texts = [_random_text(rng, rng.randrange(0, 60)) for _ in range(3000)]
    texts += _code_points()[::97]
    for text, count in zip(texts, embedder.count_tokens(texts), strict=True):
        assert count <= token_bound(len(text.encode())), repr(text)
    assert token_bound(0) == 2
    assert token_bound(10**9) == MAX_TOKENS


def test_long_texts_give_the_ids_of_the_whole_text(embedder: LocalEmbedder) -> None:
    """encode tokenizes only a prefix of a long text: the ids are those of the whole."""
    rng = random.Random(7)
    tokenizer = _plain_tokenizer()
    texts = [_random_text(rng, rng.randrange(500, 20_000)) for _ in range(40)]
    texts += [
        "no-whitespace-at-all" * 3000,
        " " * 50_000 + "late words " * 10,
        "x" * 4095 + " " + "tail " * 300,
        "\u00a0".join(["nbsp"] * 5000),  # no ASCII whitespace: the whole text
        "a " * 2000 + "b" * 100_000,
        "[MASK] " * 3000,
    ]
    for text in texts:
        assert embedder.encode([text]) == [tokenizer.encode(text).ids], repr(text[:80])


def test_a_long_text_is_not_tokenized_whole(embedder: LocalEmbedder) -> None:
    text = "compute for everyone " * 200_000  # 4.2 MB: about 4 s to tokenize whole
    started = time.perf_counter()
    assert embedder.count_tokens([text]) == [MAX_TOKENS]
    assert time.perf_counter() - started < 0.5


# -- token-id inputs (issue 15) -------------------------------------------------------------


def test_token_ids_are_the_tokenizers_and_embed_as_given() -> None:
    """VOCAB_SIZE is the tokenizer's (the endpoint refuses ids outside it: onnxruntime
    fails on them); the ids of a text, [CLS] and [SEP] in, embed to the text's vector."""
    assert _plain_tokenizer().get_vocab_size() == VOCAB_SIZE
    embedder = get_local_embedder()
    assert embedder.embed_ids([[0, 101, VOCAB_SIZE - 1]]).shape == (1, DIMENSIONS)
    with pytest.raises(Exception, match="out of"):
        embedder.embed_ids([[101, VOCAB_SIZE]])
    vectors, counts = embedder.embed(["a cat sat on the mat"])
    [ids] = embedder.encode(["a cat sat on the mat"])
    assert (ids[0], ids[-1], counts) == (101, 102, [len(ids)])  # [CLS] ... [SEP]
    np.testing.assert_allclose(embedder.embed_ids([ids]), vectors, atol=1e-6)
