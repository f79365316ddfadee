"""``parse_export_line`` (orjson first) reads every line exactly as json alone would."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.audit.source import SourceError, parse_export_line


def reference(line: bytes) -> Any:
    """The reader before orjson: json, int(seq), strict base64."""
    try:
        item = json.loads(line)
        return int(item["seq"]), base64.b64decode(item["entry"], validate=True)
    except (ValueError, KeyError, TypeError):
        return "refused"
    except OverflowError:  # int(Infinity): raised by both
        return "overflow"


def ours(line: bytes) -> Any:
    try:
        return parse_export_line(line, "x", 1)
    except SourceError:
        return "refused"
    except OverflowError:
        return "overflow"


_seqs = st.one_of(
    st.integers().map(str),
    st.sampled_from(
        [
            "18446744073709551616",
            "-9223372036854775809",
            "1.0",
            "1e3",
            "1E400",
            "NaN",
            "-0",
            '"5"',
            "true",
            "null",
            "[1]",
        ]
    ),
)
_entries = st.one_of(
    st.binary(max_size=30).map(lambda b: json.dumps(base64.b64encode(b).decode())),
    st.text(st.sampled_from(list("QUJD=+/ \\\n\u00e9\ud800")), max_size=12).map(
        lambda s: json.dumps(s, ensure_ascii=False)
    ),
    st.sampled_from(['"\\ud800"', "1", "null", '"QUJD"']),
)


@settings(max_examples=1500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just('"seq"'), _seqs),
            st.tuples(st.just('"entry"'), _entries),
            st.tuples(st.just('"x"'), _seqs),
        ),
        max_size=4,
    ),
    st.sampled_from(["", " ", "\ufeff"]),
)
def test_lines_read_as_json_reads_them(fields: list[tuple[str, str]], before: str) -> None:
    line = (before + "{" + ", ".join(f"{k}: {v}" for k, v in fields) + "}").encode(
        "utf-8", "surrogatepass"
    )
    assert ours(line) == reference(line), line


@pytest.mark.parametrize(
    "line",
    [
        b'{"seq": 3, "entry": "QUJD"}',
        b'{"seq": 3, "seq": 4, "entry": "QUJD"}',
        b'{"seq": 18446744073709551617, "entry": "QUJD"}',
        b'{"seq": 3.5, "entry": "QUJD"}',
        b'{"seq": 3, "entry": "QUJ"}',
        b'{"seq": 3, "entry": "QU JD"}',
        b'[3, "QUJD"]',
        b"",
        b"\xff",
    ],
)
def test_edge_lines(line: bytes) -> None:
    assert ours(line) == reference(line)
