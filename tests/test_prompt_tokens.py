"""Holds that fit the prompt (issue 14, item 4): a chat model with a ``tokenizer`` in the
models file is held for its prompt counted by that tokenizer (plus the chat template's
overhead), never below the upstream's reported usage and far below the byte bound.

The corpus (``tests/testdata/prompt_corpus.json``) has prompts in many scripts and
languages, with names, tools, tool calls, images, schemas and stop sequences. The
"upstream's reported usage" is the fake upstream's OpenAI-like count with cl100k_base
(``tests/upstream.py``: ``tiktoken_encoding``). End to end: the official ``openai`` SDK →
the served gateway (SQLite and PostgreSQL) → the fake upstream. Prices here: 1 CU per
input and per output token (1,000 per 1K), so a hold of ``bound + max_tokens`` CU shows the
prompt's bound, and a clamped ``max_tokens`` shows it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_gateway import Env, balance, serve_gateway
from tests.upstream import openai_prompt_tokens, tiktoken_counter
from ubc.gateway import routes, tokens
from ubc.gateway.catalog import ModelsFileError, load_catalog
from ubc.gateway.service import estimate_tokens, prompt_bound
from ubc.gateway.tokens import (
    IMAGE_TOKEN_BOUND,
    PromptTokenizer,
    cookbook_tokens,
    load_tokenizer,
)

TESTDATA = Path(__file__).parent / "testdata"
CORPUS: list[dict[str, Any]] = json.loads((TESTDATA / "prompt_corpus.json").read_text())["prompts"]
MINILM = Path(routes.__file__).parent / "_minilm" / "tokenizer.json"

CL100K = PromptTokenizer(load_tokenizer("tiktoken", "cl100k_base"))
WORDPIECE = PromptTokenizer(load_tokenizer("tokenizers", MINILM))
upstream_count = tiktoken_counter("cl100k_base")


def reported(body: dict[str, Any]) -> int:
    """The fake upstream's prompt_tokens for ``body`` (OpenAI's count with cl100k_base)."""
    return openai_prompt_tokens(body, upstream_count)


# -- the bound on the corpus ----------------------------------------------------------------


@pytest.mark.parametrize("prompt", CORPUS, ids=[p["name"] for p in CORPUS])
def test_the_tokenizer_bound_covers_the_reported_usage(prompt: dict[str, Any]) -> None:
    body = prompt["body"]
    bound = CL100K.bound(body)
    assert bound >= reported(body)
    assert bound >= cookbook_tokens(body["messages"], CL100K.tokenizer.count)
    assert bound <= prompt_bound(body)


def test_the_tokenizer_bound_is_far_below_the_byte_bound_on_the_corpus() -> None:
    """Measured: the tokenizer bound is 0.33 of the byte bound on average over the corpus
    (0.07 to 0.94: an image's data URL is no text; two images by URL are mostly their
    1,500 each), and within 5 % of the reported usage on every long prompt of text."""
    ratios = [CL100K.bound(p["body"]) / prompt_bound(p["body"]) for p in CORPUS]
    assert sum(ratios) / len(ratios) <= 0.4
    assert max(ratios) < 1
    text_only = [p["body"] for p in CORPUS if p["name"].endswith("-long")]
    assert len(text_only) >= 6
    for body in text_only:
        assert CL100K.bound(body) <= reported(body) * 1.05
        assert CL100K.bound(body) * 2.5 <= prompt_bound(body)


def test_images_count_their_bound_not_their_url() -> None:
    url = "data:image/png;base64," + "A" * 100_000
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert IMAGE_TOKEN_BOUND < CL100K.bound(body) < IMAGE_TOKEN_BOUND + 20
    assert prompt_bound(body) > 100_000


@pytest.mark.parametrize("prompt", CORPUS, ids=[p["name"] for p in CORPUS])
def test_the_tokenizers_bound_covers_its_own_count(prompt: dict[str, Any]) -> None:
    """A ``tokenizer.json`` (the shipped BERT WordPiece): the bound is at least the
    cookbook's formatting counted with that tokenizer, with nothing cut at its 128."""
    messages = prompt["body"]["messages"]
    count = WORDPIECE.tokenizer.count
    assert WORDPIECE.bound(prompt["body"]) >= cookbook_tokens(messages, count)


def test_a_tokenizer_json_is_not_cut_nor_padded() -> None:
    text = "compute for everyone " * 200
    assert WORDPIECE.tokenizer.count(text) == 600  # the file says truncate at 128
    assert WORDPIECE.tokenizer.count("hi") == 1  # and pad to 128


_roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), st.text())
_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text()}), min_size=1, max_size=4
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": _roles, "content": st.one_of(st.text(), _parts)},
        optional={"name": st.text(min_size=1, max_size=20)},
    ),
    min_size=1,
    max_size=6,
)


@given(messages=_messages)
def test_the_bound_is_never_below_the_cookbook_count(messages: list[dict[str, Any]]) -> None:
    body = {"messages": messages}
    for prompt in (CL100K, WORDPIECE):
        assert prompt.bound(body) >= cookbook_tokens(messages, prompt.tokenizer.count)
    assert CL100K.bound(body) >= reported(body)


_text = st.text(max_size=60)
_calls = st.lists(
    st.fixed_dictionaries(
        {
            "id": _text,
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": _text, "arguments": _text}),
        }
    ),
    min_size=1,
    max_size=3,
)
_property = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "integer", "boolean"]), "description": _text},
    optional={"enum": st.lists(_text, max_size=4)},
)
_tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {
                    "name": _text,
                    "description": _text,
                    "parameters": st.fixed_dictionaries(
                        {
                            "type": st.just("object"),
                            "properties": st.dictionaries(_text, _property, max_size=4),
                        }
                    ),
                }
            ),
        }
    ),
    max_size=3,
)


@given(calls=_calls, tools=_tools, content=_text)
def test_tools_and_tool_calls_are_held_for_at_least_openais_count(
    calls: list[dict[str, Any]], tools: list[dict[str, Any]], content: str
) -> None:
    """Tool calls and tools are counted as their JSON, which is at least OpenAI's count of
    them (the cookbook's estimate for tools; a call's name and arguments + 3). Checked
    on 3,000 examples once; the default number here."""
    body: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": None, "tool_calls": calls},
        ]
    }
    if tools:
        body["tools"] = tools
    assert CL100K.bound(body) >= reported(body)


@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_a_string_value_is_counted_as_its_tokens(text: str) -> None:
    """Each value is tokenized alone, as OpenAI's template does (special tokens between
    values): the bound of one message is exactly the cookbook's + 2 + 5 (the default
    overheads' excess over OpenAI's 3 and 3)."""
    body = {"messages": [{"role": "user", "content": text}]}
    assert CL100K.bound(body) == cookbook_tokens(body["messages"], CL100K.tokenizer.count) + 7


def test_a_lone_surrogate_counts_at_least_as_the_replacement_character() -> None:
    """JSON allows "\\ud800"; a lenient upstream reads it as U+FFFD (tiktoken does too),
    a strict one refuses the call. `tokenizers` refuses such a string: the value is then
    bounded by its escaped JSON text (at least its UTF-8 size)."""
    lone = {"messages": [{"role": "user", "content": "a\ud800b"}]}
    replaced = {"messages": [{"role": "user", "content": "a\ufffdb"}]}
    for prompt in (CL100K, WORDPIECE):
        assert prompt.bound(lone) >= prompt.bound(replaced)
    assert WORDPIECE.bound(lone) == 8 + 5 + 1 + len('"a\\ud800b"')


# -- the models file ------------------------------------------------------------------------

CHAT = 'backend = "upstream"\nkind = "chat"\nurl = "http://127.0.0.1:9/v1"\ninput_price = 1\n'


def models_file(tmp_path: Path, tokenizer: str, kind: str = "chat") -> Path:
    path = tmp_path / "models.toml"
    entry = CHAT.replace('"chat"', f'"{kind}"')
    path.write_text(f'[models."m-1"]\n{entry}tokenizer = {tokenizer}\n')
    return path


def test_a_tiktoken_encoding_loads_offline_and_once(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    text = f'{CHAT}tokenizer = {{ tiktoken = "cl100k_base" }}\n'
    path.write_text(f'local_embeddings = false\n[models."a"]\n{text}[models."b"]\n{text}')
    catalog = load_catalog(path)
    a, b = catalog["a"].tokenizer, catalog["b"].tokenizer
    assert a is not None
    assert b is not None
    assert a.tokenizer is b.tokenizer is CL100K.tokenizer
    assert (a.message_overhead, a.request_overhead) == (5, 8)
    assert a.tokenizer.count("hello world") == 2


def test_a_relative_tokenizer_json_is_read_next_to_the_models_file(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    shutil.copy(MINILM, tmp_path / "tok" / "tokenizer.json")
    path = models_file(
        tmp_path,
        '{ tokenizers = "tok/tokenizer.json", message_overhead = 9, request_overhead = 30 }',
    )
    spec = load_catalog(path)["m-1"]
    assert spec.tokenizer is not None
    assert spec.tokenizer.tokenizer.kind == "tokenizers"
    assert (spec.tokenizer.message_overhead, spec.tokenizer.request_overhead) == (9, 30)
    body = {"messages": [{"role": "user", "content": "compute for everyone"}]}
    assert spec.tokenizer.bound(body) == 30 + 9 + 1 + 3


@pytest.mark.parametrize(
    ("tokenizer", "says"),
    [
        ('{ tiktoken = "cl99k_nope" }', "unknown tiktoken encoding 'cl99k_nope'"),
        ('{ tokenizers = "missing/tokenizer.json" }', "does not exist"),
        ('{ tokenizers = "models.toml" }', "is not a tokenizer.json"),
        ('{ tiktoken = "cl100k_base", tokenizers = "t.json" }', "exactly one of"),
        ("{ }", "exactly one of"),
        ('{ tiktoken = "cl100k_base", message_overhead = 2 }', "greater than or equal to 3"),
        ('{ tiktoken = "cl100k_base", request_overhead = 0 }', "greater than or equal to 3"),
        ('{ tiktoken = "cl100k_base", template = "x" }', "Extra inputs"),
        ('"cl100k_base"', "tokenizer"),
    ],
)
def test_a_bad_tokenizer_stops_the_start_naming_the_model(
    tmp_path: Path, tokenizer: str, says: str
) -> None:
    with pytest.raises(ModelsFileError) as error:
        load_catalog(models_file(tmp_path, tokenizer))
    assert says in str(error.value)
    assert "m-1" in str(error.value)


def test_an_embeddings_model_takes_no_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="only a chat model"):
        load_catalog(models_file(tmp_path, '{ tiktoken = "cl100k_base" }', kind="embeddings"))


def test_an_encoding_not_on_this_machine_says_how_to_provide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelsFileError) as error:
        load_catalog(models_file(tmp_path, '{ tiktoken = "o200k_base" }'))
    message = str(error.value)
    assert "'m-1'" in message
    assert "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken" in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert str(tmp_path / "cache") in message


def test_an_encoding_in_tiktokens_cache_is_read_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any name but cl100k_base comes from tiktoken's cache (hash-checked by tiktoken):
    shown with cl100k_base itself, its offline alias turned off and its file put in a
    fresh cache where the error message says."""
    import tiktoken_ext

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tokens, "OFFLINE_ALIASES", {})
    monkeypatch.setattr(tokens, "_cache", {})
    with pytest.raises(tokens.TokenizerError) as error:
        load_tokenizer("tiktoken", "cl100k_base")
    cached = Path(str(error.value).split(" and save it as ")[1].split(" ")[0])
    cached.parent.mkdir(parents=True)
    bundled = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    shutil.copy(bundled, cached)
    loaded = load_tokenizer("tiktoken", "cl100k_base")
    assert loaded is not CL100K.tokenizer
    assert loaded.count("compute for everyone") == CL100K.tokenizer.count("compute for everyone")


def test_a_cached_file_that_is_not_the_published_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked before tiktoken reads it (tiktoken would delete it and download again)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not it")
    with pytest.raises(tokens.TokenizerError, match="SHA-256 .* download .* again"):
        load_tokenizer("tiktoken", "o200k_base")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(tokens.TokenizerError, match="turns off"):
        load_tokenizer("tiktoken", "o200k_base")
    with pytest.raises(tokens.TokenizerError, match="unknown tiktoken encoding 'gpt2'"):
        load_tokenizer("tiktoken", "gpt2")  # two files, downloaded: not offered


def test_the_published_hashes_are_tiktokens() -> None:
    """The table of files and SHA-256s is the one tiktoken's constructors use (an alias
    such as o200k_harmony calls its base's constructor)."""
    import tiktoken_ext.openai_public as published

    source = Path(published.__file__).read_text()
    for name, (filename, sha256) in tokens.TIKTOKEN_FILES.items():
        function = source[source.index(f"def {name}():") + 1 :]
        ends = [function.find(mark) for mark in ("\ndef ", "\nENCODING_")]
        function = function[: min(end for end in ends if end >= 0)]
        base = filename.removesuffix(".tiktoken")
        assert (f"encodings/{filename}" in function and sha256 in function) or (
            f"{base}()" in function
        ), name


# -- end to end: the SDK, the served gateway, the upstream's reported usage -----------------

MODELS = """
local_embeddings = false

[models."chat-tk"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 1000
max_output_tokens = 64
tokenizer = {{ tiktoken = "cl100k_base" }}

[models."chat-bytes"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 1000
max_output_tokens = 64

[models."chat-tk-no-usage"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:no-usage"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 1000
tokenizer = {{ tiktoken = "cl100k_base" }}

[models."chat-tk-cut-stream"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake:cut-after-3"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 1000
tokenizer = {{ tiktoken = "cl100k_base" }}

[models."chat-wp"]
backend = "upstream"
kind = "chat"
url = "{api_base}"
upstream_model = "fake-chat"
api_key_env = "UBC_TEST_UPSTREAM_KEY"
input_price = 1000
output_price = 1000
tokenizer = {{ tokenizers = "tok/tokenizer.json" }}
"""


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The served ledger of tests/test_gateway.py, its upstream reporting OpenAI's count
    with cl100k_base, and the models above."""
    (tmp_path / "tok").mkdir()
    shutil.copy(MINILM, tmp_path / "tok" / "tokenizer.json")
    with serve_gateway(
        db_url,
        tmp_path,
        monkeypatch,
        lambda api_base: MODELS.format(api_base=api_base),
        tiktoken_encoding="cl100k_base",
    ) as made:
        yield made


def usage_entries(env: Env) -> list[dict[str, Any]]:
    """The ``usage`` payloads of the journal, in order (read with the auditor's token)."""
    response = httpx.get(
        f"{env.server.url}/journal/entries",
        params={"start": 0, "end": 1000},
        headers={"authorization": f"Bearer {env.server.auditor_token}"},
    )
    response.raise_for_status()
    payloads = []
    for item in response.json()["entries"]:
        envelope = json.loads(base64.b64decode(item["entry"]))["envelope"]
        if envelope["payloadType"].endswith(".usage+json"):
            payloads.append(json.loads(base64.b64decode(envelope["payload"])))
    return payloads


def test_every_corpus_prompt_is_held_at_least_its_reported_usage(env: Env) -> None:
    """Through the SDK: each call's hold (``bound + max_tokens`` CU, in its usage entry)
    covers the prompt_tokens the upstream reported, and is the tokenizer bound."""
    _, secret = env.member("alice", 1_000_000)
    sdk = env.sdk(secret)
    reports = []
    for prompt in CORPUS:
        answer = sdk.chat.completions.create(model="chat-tk", max_tokens=1, **prompt["body"])
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == reported(prompt["body"])
        reports.append(answer.usage.prompt_tokens)
    env.settled()
    entries = usage_entries(env)
    assert len(entries) == len(CORPUS)
    for prompt, entry, tokens_reported in zip(CORPUS, entries, reports, strict=True):
        held_for_prompt = entry["held"] - 1  # 1 CU per token; max_tokens = 1
        assert entry["input_tokens"] == tokens_reported
        assert held_for_prompt >= tokens_reported, prompt["name"]
        assert held_for_prompt == CL100K.bound(prompt["body"]), prompt["name"]
        assert entry["cost"] == tokens_reported + entry["output_tokens"]


def test_a_member_between_the_bounds_is_served_now(env: Env) -> None:
    """A balance above the tokenizer bound but below the byte bound: 402 at the byte bound
    (a model without a tokenizer), served with a tokenizer, ``max_tokens`` clamped to
    what is left after the tokenizer bound, billed the reported usage."""
    body = next(p["body"] for p in CORPUS if p["name"] == "zh-long")
    bound = CL100K.bound(body)
    assert 3 * bound < prompt_bound(body)
    member, secret = env.member("alice", bound + 10)
    sdk = env.sdk(secret)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.chat.completions.create(model="chat-bytes", max_tokens=40, **body)
    assert refused.value.status_code == 402
    answer = sdk.chat.completions.create(model="chat-tk", max_tokens=40, **body)
    assert env.upstream.stats().last_request_body["max_tokens"] == 10
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == reported(body) <= bound
    assert answer.usage.completion_tokens == 10
    env.settled()
    assert balance(member)["posted"] == bound + 10 - (reported(body) + 10)


def test_without_reported_usage_the_tokenizer_count_is_billed(env: Env) -> None:
    body = next(p["body"] for p in CORPUS if p["name"] == "ru-long")
    member, secret = env.member("alice", 100_000)
    answer = env.sdk(secret).chat.completions.create(model="chat-tk-no-usage", max_tokens=4, **body)
    assert answer.usage is None
    text = answer.choices[0].message.content or ""
    env.settled()
    billed = CL100K.bound(body) + estimate_tokens(len(text.encode()))
    assert billed < estimate_tokens(prompt_bound(body))  # what it was billed before
    [entry] = usage_entries(env)
    assert (entry["input_tokens"], entry["output_tokens"]) == (CL100K.bound(body), 5), text
    # Never more than the hold: the prompt's bound and the 4 tokens asked.
    assert balance(member)["posted"] == 100_000 - min(billed, CL100K.bound(body) + 4)


def test_a_cut_stream_bills_the_tokenizer_count(env: Env) -> None:
    """A stream cut before its usage chunk: billed the prompt's tokenizer bound and one
    token per content chunk received (before: a quarter of the byte bound)."""
    body = next(p["body"] for p in CORPUS if p["name"] == "ar-long")
    member, secret = env.member("alice", 100_000)
    response = httpx.post(
        f"{env.server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {secret}"},
        json={"model": "chat-tk-cut-stream", "stream": True, "max_tokens": 10, **body},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.text.count('"content":"tok') == 3
    env.settled()
    assert balance(member)["posted"] == 100_000 - (CL100K.bound(body) + 3)


def test_a_tokenizer_json_model_is_held_for_its_count(env: Env) -> None:
    body = {"messages": [{"role": "user", "content": "compute for everyone " * 100}]}
    bound = WORDPIECE.bound(body)
    assert bound == 8 + 5 + 1 + 300
    _, secret = env.member("alice", bound + 5)
    env.sdk(secret).chat.completions.create(model="chat-wp", max_tokens=20, **body)
    assert env.upstream.stats().last_request_body["max_tokens"] == 5


def test_a_large_image_is_held_for_its_bound_not_its_url(env: Env) -> None:
    """A 900 KB data URL (aiohttp warns about bodies above 1 MiB, an error under pytest):
    no text to tokenize, held for the image's 1,500 and the text."""
    url = "data:image/png;base64," + "iVBORw0KGgo" * (900_000 // 11)
    parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert prompt_bound(body) > 900_000
    assert prompt_bound(body) - tokens.image_bytes(body) < 100
    bound = CL100K.bound(body)
    assert bound < IMAGE_TOKEN_BOUND + 30
    _, secret = env.member("alice", bound + 5)
    answer = env.sdk(secret).chat.completions.create(model="chat-tk", max_tokens=30, **body)
    assert env.upstream.stats().last_request_body["max_tokens"] == 5
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == reported(body) <= bound


def test_a_large_prompt_is_counted_in_the_keys_cpu_slot(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above INLINE_TOKENIZE_BYTES the count runs in the gateway's CPU pool (not on the
    event loop); above MAX_TOKENIZED_BYTES it does not run: the byte bound is held."""
    threads: list[str] = []
    original = PromptTokenizer.bound

    def recording(self: PromptTokenizer, body: dict[str, Any]) -> int:
        threads.append(threading.current_thread().name)
        return original(self, body)

    monkeypatch.setattr(PromptTokenizer, "bound", recording)
    body = {"messages": [{"role": "user", "content": "Каждый участник получает долю. " * 1000}]}
    assert prompt_bound(body) > routes.INLINE_TOKENIZE_BYTES
    bound = original(CL100K, body)
    _, secret = env.member("alice", bound + 3)
    sdk = env.sdk(secret)
    sdk.chat.completions.create(model="chat-tk", max_tokens=20, **body)
    assert env.upstream.stats().last_request_body["max_tokens"] == 3
    assert threads == ["ubc-gateway-cpu_0"]
    _, rich = env.member("bob", 10**7)
    bob = env.sdk(rich)
    bob.chat.completions.create(
        model="chat-tk", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
    )
    assert not threads[1].startswith("ubc-gateway-cpu")  # on the event loop's thread

    monkeypatch.setattr(routes, "MAX_TOKENIZED_BYTES", 1000)
    bob.chat.completions.create(model="chat-tk", max_tokens=1, **body)
    assert len(threads) == 2  # not tokenized
    env.settled()
    assert usage_entries(env)[-1]["held"] == prompt_bound(body) + 1


def measure() -> None:
    """The figures of the docs: the bound's ratio to the byte bound on the corpus, and the
    cost of counting per KB (``PYTHONPATH=. python -m tests.test_prompt_tokens``)."""
    import statistics
    import sys
    import time

    ratios = [CL100K.bound(p["body"]) / prompt_bound(p["body"]) for p in CORPUS]
    sys.stdout.write(
        f"corpus: {len(CORPUS)} prompts; tokenizer bound / byte bound: mean "
        f"{statistics.mean(ratios):.3f}, median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}\n"
    )
    longs = {p["name"]: p["body"] for p in CORPUS if p["name"].endswith("-long")}
    for label, prompt in (("tiktoken cl100k_base", CL100K), ("tokenizers MiniLM", WORDPIECE)):
        for name, body in longs.items():
            big = {"messages": body["messages"] * max(1, (1 << 20) // prompt_bound(body))}
            kb = prompt_bound(big) / 1024
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                prompt.bound(big)
                best = min(best, time.perf_counter() - start)
            sys.stdout.write(
                f"{label:21} {name:9} {kb:6.0f} KB {best * 1e3:7.1f} ms "
                f"{best * 1e6 / kb:6.1f} µs/KB\n"
            )


if __name__ == "__main__":
    measure()
