"""``export_ranges`` (byte ranges a worker reads itself) gives the lines ``export_blocks``
gives, with the same line numbers, whatever the blank lines and the range size."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.audit.source import export_blocks, export_ranges, read_range


def numbered(blocks: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines of blocks, as a worker numbers them."""
    return [
        (number + i, line)
        for number, blob in blocks
        for i, line in enumerate(blob.split(b"\n"))
        if line.strip()
    ]


_lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b" ", b"\t", b"\r"]),
        st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\n", b"x")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=_lines,
    trailing=st.booleans(),
    size=st.integers(1, 64),
    skip=st.integers(0, 3),
)
def test_ranges_give_the_lines_of_blocks(
    tmp_path_factory: object, lines: list[bytes], trailing: bool, size: int, skip: int
) -> None:
    path = Path(tmp_path_factory.mktemp("export")) / "export.jsonl"  # type: ignore[attr-defined]
    text = b"\n".join([b'{"format": "header"}', *lines]) + (b"\n" if trailing else b"")
    path.write_bytes(text)
    expected = numbered(list(export_blocks(path, 3, skip=skip)))
    ranges = list(export_ranges(path, size, skip=skip))
    got = numbered([(number, read_range(str(path), o, n)) for number, o, n in ranges])
    assert got == expected
    # Ranges are whole lines, in order, without gaps or overlaps.
    for (_, o1, n1), (_, o2, _) in zip(ranges, ranges[1:], strict=False):
        assert o1 + n1 == o2
    if ranges:
        last = ranges[-1]
        assert last[1] + last[2] == len(text)
