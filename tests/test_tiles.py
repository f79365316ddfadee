"""Tests of the C2SP formats: tlog-tiles (ubc.journal.tiles), tlog-checkpoint bodies and
tlog-proof files (ubc.journal.checkpoint)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.journal.checkpoint import (
    Checkpoint,
    TlogProof,
    format_checkpoint,
    format_tlog_proof,
    parse_checkpoint,
    parse_tlog_proof,
)
from ubc.journal.merkle import (
    EMPTY_ROOT,
    MemoryHashStore,
    append_leaves,
    inclusion_proof,
    leaf_hash,
    root,
    verify_inclusion,
)
from ubc.journal.tiles import (
    EntriesID,
    TileID,
    entries_path,
    entry_bundle,
    parse_entries_path,
    parse_entry_bundle,
    parse_tile,
    parse_tile_path,
    tile_bytes,
    tile_counts,
    tile_exists,
    tile_node_ids,
    tile_nodes,
    tile_path,
)

# ----------------------------------------------------------------- tile paths


def test_tile_path_spec_examples() -> None:
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(0, 0) == "tile/0/000"
    assert tile_path(2, 1000) == "tile/2/x001/000"
    assert tile_path(1, 5, 17) == "tile/1/005.p/17"
    assert entries_path(1234067, 112) == "tile/entries/x001/x234/067.p/112"
    assert parse_tile_path("tile/0/x001/x234/067") == TileID(0, 1234067, None)
    assert parse_tile_path("0/x001/x234/067.p/5") == TileID(0, 1234067, 5)
    assert parse_tile_path("63/999") == TileID(63, 999, None)
    assert parse_entries_path("entries/x001/x234/067") == EntriesID(1234067, None)
    assert parse_entries_path("tile/entries/000.p/255") == EntriesID(0, 255)


@settings(max_examples=300)
@given(
    st.integers(min_value=0, max_value=63),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.none() | st.integers(min_value=1, max_value=255),
)
def test_tile_path_round_trip(level: int, n: int, width: int | None) -> None:
    path = tile_path(level, n, width)
    assert parse_tile_path(path) == (level, n, width)
    assert parse_tile_path(path.removeprefix("tile/")) == (level, n, width)
    bundle = entries_path(n, width)
    assert parse_entries_path(bundle) == (n, width)
    assert parse_entries_path(bundle.removeprefix("tile/")) == (n, width)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "0",
        "0/",
        "/0/000",
        "00/000",  # leading zero in level
        "64/000",  # level out of range
        "-1/000",
        "a/000",
        "0/67",  # not 3 digits
        "0/0067",
        "0/x067",  # last element with x
        "0/001/067",  # non-last element without x
        "0/x000/067",  # non-canonical leading zero group
        "0/x001/x234/067/",
        "0/000.p/0",  # width 0
        "0/000.p/256",  # width too big
        "0/000.p/05",  # leading zero in width
        "0/000.p/",
        "0/000.p",
        "0/000.q/5",
        "0/000.p/5/6",
        "0/\u0663\u0663\u0663",  # non-ASCII digits
        "0/ 12",
        "0/x018/x446/x744/x073/x709/x551/616",  # 2**64
        "entries/000",  # a bundle is not a tile
        "tile/tile/0/000",
    ],
)
def test_parse_tile_path_rejects(path: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- any reason is fine
        parse_tile_path(path)


@pytest.mark.parametrize(
    "path", ["entries", "entries/", "entries/67", "0/000", "entries/x000/001", "entry/000"]
)
def test_parse_entries_path_rejects(path: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- any reason is fine
        parse_entries_path(path)


def test_tile_path_argument_errors() -> None:
    with pytest.raises(ValueError, match="level"):
        tile_path(64, 0)
    with pytest.raises(ValueError, match="width"):
        tile_path(0, 0, 256)
    with pytest.raises(ValueError, match="width"):
        entries_path(0, 0)
    with pytest.raises(ValueError, match="index"):
        tile_path(0, -1)


# ----------------------------------------------------------------- tile contents


def test_tile_counts_spec_examples() -> None:
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial
    # level 0 tile of width 112, one full level 1 tile, one partial level 1 tile of width
    # 17, and one partial level 2 tile of width 1."
    assert tile_counts(70_000) == [(0, 273, 112), (1, 1, 17), (2, 0, 1)]
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level
    # 1 tile of width 1."
    assert tile_counts(256) == [(0, 1, 0), (1, 0, 1)]
    assert tile_counts(0) == []
    assert tile_exists(0, 272, None, 70_000)
    assert not tile_exists(0, 273, None, 70_000)
    assert tile_exists(0, 273, 112, 70_000)
    assert not tile_exists(0, 273, 113, 70_000)
    assert tile_exists(1, 1, 17, 70_000)
    assert tile_exists(2, 0, 1, 70_000)
    assert not tile_exists(2, 0, 2, 70_000)
    assert tile_exists(1, 0, 1, 256)


def _store(n: int) -> tuple[MemoryHashStore, list[bytes]]:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    store = MemoryHashStore()
    nodes, _ = append_leaves(0, [], leaves)
    store.add(nodes)
    return store, leaves


def test_tile_node_ids_and_bytes() -> None:
    assert tile_node_ids(0, 2, 3) == [(0, 512), (0, 513), (0, 514)]
    assert tile_node_ids(1, 0, 2) == [(8, 0), (8, 1)]
    assert len(tile_node_ids(2, 1, None)) == 256
    assert tile_node_ids(2, 1, None)[0] == (16, 256)

    size = 256 * 3 + 5
    store, leaves = _store(size)
    full = tile_bytes(0, 1, None, store)
    assert parse_tile(full) == leaves[256:512]
    partial = tile_bytes(0, 3, 5, store)
    assert parse_tile(partial, 5) == leaves[768:]
    level1 = parse_tile(tile_bytes(1, 0, 3, store), 3)
    for i, digest in enumerate(level1):  # each is the root of 256 consecutive leaves
        _, frontier = append_leaves(0, [], leaves[256 * i : 256 * (i + 1)])
        assert frontier == [digest]
    with pytest.raises(ValueError, match="hashes"):
        parse_tile(partial)
    with pytest.raises(ValueError, match="hashes"):
        parse_tile(partial + b"x", 5)


def test_tile_nodes_rebuild_the_store() -> None:
    # An auditor holding only tiles can recompute every stored hash, hence any proof.
    size = 256 * 2 + 77
    store, leaves = _store(size)
    rebuilt = MemoryHashStore()
    for level, full, width in tile_counts(size):
        for n in range(full):
            rebuilt.add(tile_nodes(level, n, parse_tile(tile_bytes(level, n, None, store))))
        if width:
            data = tile_bytes(level, full, width, store)
            rebuilt.add(tile_nodes(level, full, parse_tile(data, width)))
    assert len(rebuilt) == len(store)
    assert root(size, rebuilt) == root(size, store)
    proof = inclusion_proof(300, size, rebuilt)
    verify_inclusion(leaves[300], 300, size, proof, root(size, store))


# ----------------------------------------------------------------- entry bundles


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=256))
def test_entry_bundle_round_trip(entries: list[bytes]) -> None:
    data = entry_bundle(entries)
    assert data[:2] == len(entries[0]).to_bytes(2, "big")
    width = None if len(entries) == 256 else len(entries)
    assert parse_entry_bundle(data, width) == entries


def test_entry_bundle_format_and_errors() -> None:
    assert entry_bundle([b"ab", b"", b"c"]) == b"\x00\x02ab\x00\x00\x00\x01c"
    assert parse_entry_bundle(b"\x00\x02ab\x00\x00\x00\x01c", 3) == [b"ab", b"", b"c"]
    big = bytes(65535)
    assert parse_entry_bundle(entry_bundle([big]), 1) == [big]
    with pytest.raises(ValueError, match="65535"):
        entry_bundle([bytes(65536)])
    with pytest.raises(ValueError, match="entries"):
        entry_bundle([])
    with pytest.raises(ValueError, match="truncated"):
        parse_entry_bundle(b"\x00\x03ab", 1)
    with pytest.raises(ValueError, match="truncated"):
        parse_entry_bundle(b"\x00\x01a\x00", 2)
    with pytest.raises(ValueError, match="want 2"):
        parse_entry_bundle(b"\x00\x01a", 2)
    with pytest.raises(ValueError, match="want 256"):
        parse_entry_bundle(b"\x00\x01a")


# ----------------------------------------------------------------- checkpoints

SPEC_CHECKPOINT = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)


def test_checkpoint_spec_example() -> None:
    cp = parse_checkpoint(SPEC_CHECKPOINT)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert format_checkpoint(cp.origin, cp.size, cp.root) == SPEC_CHECKPOINT


@given(
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs")),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.binary(min_size=32, max_size=32),
    st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1), max_size=3),
)
def test_checkpoint_round_trip(origin: str, size: int, root_hash: bytes, ext: list[str]) -> None:
    text = format_checkpoint(origin, size, root_hash, ext)
    assert parse_checkpoint(text) == Checkpoint(origin, size, root_hash, tuple(ext))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "origin\n0\n",
        "origin\n0\n" + base64.b64encode(EMPTY_ROOT).decode(),  # no final newline
        "\n0\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",  # empty origin
        "o\n01\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",  # leading zero
        "o\n+1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",
        "o\n18446744073709551616\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",
        "o\n1\n" + base64.b64encode(EMPTY_ROOT[:31]).decode() + "\n",  # short root
        "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode().rstrip("=") + "\n",  # no padding
        "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode()[:-2] + "V=\n",  # non-canonical
        "o\n1\n" + base64.urlsafe_b64encode(b"\xff" * 32).decode() + "\n",  # url alphabet
        "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n\n",  # empty extension
        "o\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n\n\u2014 o sig\n",  # signed note
        "o\r\n1\n" + base64.b64encode(EMPTY_ROOT).decode() + "\n",  # control character
    ],
)
def test_parse_checkpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- any reason is fine
        parse_checkpoint(text)


def test_format_checkpoint_rejects() -> None:
    with pytest.raises(ValueError, match="origin"):
        format_checkpoint("", 1, EMPTY_ROOT)
    with pytest.raises(ValueError, match="origin"):
        format_checkpoint("a\nb", 1, EMPTY_ROOT)
    with pytest.raises(ValueError, match="root"):
        format_checkpoint("o", 1, b"short")
    with pytest.raises(ValueError, match="size"):
        format_checkpoint("o", -1, EMPTY_ROOT)
    with pytest.raises(ValueError, match="extension"):
        format_checkpoint("o", 1, EMPTY_ROOT, [""])


# ----------------------------------------------------------------- tlog-proof files

SPEC_PROOF = """c2sp.org/tlog-proof@v1
extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ
index 73894
gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=
B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=
EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=
RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=
AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=

example.com/fancylog
109482
sFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=

\u2014 example.com/fancylog hI2DJw[...]1roloI=
\u2014 witness1.example mJirIklj[...]qY9v2B/5bg==
\u2014 witness2.example TnKKVHLX[...]xwYwrSjgow==
\u2014 witness3.example S4X82uH5[...]3oEcROGLFQ==
"""


def test_tlog_proof_spec_example() -> None:
    proof = parse_tlog_proof(SPEC_PROOF)
    assert proof.index == 73894
    assert proof.extra == base64.b64decode("YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ")
    assert len(proof.proof) == 5
    assert proof.proof[0] == base64.b64decode("gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=")
    assert proof.checkpoint.startswith("example.com/fancylog\n109482\n")
    assert proof.checkpoint.endswith("3oEcROGLFQ==\n")
    body = proof.checkpoint.split("\n\n", 1)[0] + "\n"
    assert parse_checkpoint(body).size == 109482
    assert format_tlog_proof(proof.index, proof.proof, proof.checkpoint, proof.extra) == SPEC_PROOF


def test_tlog_proof_other_implementations() -> None:
    # Expected strings from transparency-dev's and other tlog-proof tests.
    h1 = leaf_hash(b"1")
    b1 = base64.b64encode(h1).decode()
    note = "test checkpoint\n"
    assert format_tlog_proof(5, [h1], note) == f"c2sp.org/tlog-proof@v1\nindex 5\n{b1}\n\n{note}"
    assert format_tlog_proof(0, [], "checkpoint\n") == (
        "c2sp.org/tlog-proof@v1\nindex 0\n\ncheckpoint\n"
    )
    assert parse_tlog_proof("c2sp.org/tlog-proof@v1\nindex 0\n\ncheckpoint\n") == TlogProof(
        0, (), "checkpoint\n", None
    )


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.lists(st.binary(min_size=32, max_size=32), max_size=64),
    st.none() | st.binary(max_size=100),
)
def test_tlog_proof_round_trip(index: int, hashes: list[bytes], extra: bytes | None) -> None:
    note = SPEC_CHECKPOINT + "\n\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1M=\n"
    text = format_tlog_proof(index, hashes, note, extra)
    assert parse_tlog_proof(text) == TlogProof(index, tuple(hashes), note, extra)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "c2sp.org/tlog-proof@v2\nindex 0\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\n",
        "c2sp.org/tlog-proof@v1\nindex notanumber\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nindex 01\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nindex -1\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nextra !!notbase64!!\nindex 0\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nextra AA==\nextra AA==\nindex 0\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nindex 0\nAAAA\n\ncheckpoint\n",  # short hash
        "c2sp.org/tlog-proof@v1\nindex 0\n",  # no checkpoint
        "c2sp.org/tlog-proof@v1\nindex 0\n\n",  # empty checkpoint
        "c2sp.org/tlog-proof@v1\nindex 0\n\ncheckpoint",  # no final newline
        "c2sp.org/tlog-proof@v1\nindex 0\n\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\r\nindex 0\n\ncheckpoint\n",
    ],
)
def test_parse_tlog_proof_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- any reason is fine
        parse_tlog_proof(text)
