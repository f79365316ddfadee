"""Tests of ubc.journal.merkle: conformance vectors, incremental append and proofs.

The stored-hash implementation is checked against a naive recursive transcription of
RFC 9162 §2.1 (MTH, PATH, PROOF) over plain lists of leaves.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubc.journal.merkle import (
    EMPTY_ROOT,
    MemoryHashStore,
    NodeID,
    ProofError,
    append_leaves,
    consistency_proof,
    frontier_ids,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_frontier,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "testdata" / "merkle"
VECTOR_FILES = sorted(
    p for kind in ("inclusion", "consistency") for p in (VECTORS / kind).rglob("*.json")
)

# ----------------------------------------------------------------- naive RFC reference


def _k(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH over leaf hashes."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = _k(len(leaves))
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n])."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    """RFC 9162 §2.1.4.1 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if whole else [mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, leaves[:k], whole), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def leaves_for(n: int) -> list[bytes]:
    return [leaf_hash(f"entry {i}".encode()) for i in range(n)]


def build(leaves: Sequence[bytes], batches: Sequence[int] = ()) -> MemoryHashStore:
    """Append ``leaves`` in batches of the given sizes (the rest in one final batch)."""
    store = MemoryHashStore()
    size = 0
    frontier: list[bytes] = []
    for count in [*batches, len(leaves)]:
        batch = leaves[size : size + count]
        nodes, frontier = append_leaves(size, frontier, batch)
        store.add(nodes)
        size += len(batch)
    return store


class CountingReader:
    """Wraps a store to count batched reads and ids read."""

    def __init__(self, store: MemoryHashStore) -> None:
        self.store = store
        self.calls = 0
        self.ids = 0

    def get_hashes(self, ids: Sequence[NodeID]) -> list[bytes]:
        self.calls += 1
        self.ids += len(ids)
        return self.store.get_hashes(ids)


BIG_N = 300
BIG_LEAVES = leaves_for(BIG_N)
BIG_STORE = build(BIG_LEAVES, [1, 2, 3, 100, 7])
BIG_ROOTS = [mth(BIG_LEAVES[:n]) for n in range(BIG_N + 1)]

# ----------------------------------------------------------------- conformance vectors


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def _proof(data: dict[str, Any]) -> list[bytes]:
    return [_b64(h) for h in data["proof"] or []]


@pytest.mark.parametrize(
    "vector", VECTOR_FILES, ids=[str(p.relative_to(VECTORS)) for p in VECTOR_FILES]
)
def test_conformance_vector(vector: Path) -> None:
    data = json.loads(vector.read_text())
    if vector.relative_to(VECTORS).parts[0] == "inclusion":

        def check() -> None:
            verify_inclusion(
                _b64(data["leafHash"]),
                data["leafIdx"],
                data["treeSize"],
                _proof(data),
                _b64(data["root"]),
            )

    else:

        def check() -> None:
            verify_consistency(
                data["size1"], data["size2"], _b64(data["root1"]), _b64(data["root2"]), _proof(data)
            )

    if data["wantErr"]:
        with pytest.raises(ProofError):
            check()
    else:
        check()


def test_vectors_present() -> None:
    # 98 inclusion + 98 consistency files upstream; guard against a partial copy.
    assert len(VECTOR_FILES) == 196
    assert (VECTORS / "LICENSE").is_file()


# ----------------------------------------------------------------- hashing basics


def test_hash_domain_separation() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    # RFC 6962 test vector: leaf hash of the empty entry.
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert leaf_hash(b"ab") != node_hash(b"a", b"b")


def test_known_roots_of_reference_tree() -> None:
    # The 8-leaf tree of RFC 6962 / transparency-dev test data.
    entries = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        bytes(range(0x60, 0x70)),
    ]
    store = build([leaf_hash(e) for e in entries], [3, 2])
    assert root(8, store).hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    )
    assert root(5, store).hex() == (
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"
    )
    assert [h.hex() for h in consistency_proof(2, 5, store)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]


# ----------------------------------------------------------------- incremental append


@st.composite
def sizes_and_batches(draw: st.DrawFn) -> tuple[int, list[int]]:
    n = draw(st.integers(min_value=0, max_value=BIG_N))
    batches: list[int] = []
    left = n
    while left and draw(st.booleans()):
        count = draw(st.integers(min_value=0, max_value=left))
        batches.append(count)
        left -= count
    return n, batches


@settings(max_examples=150, deadline=None)
@given(sizes_and_batches())
def test_append_matches_naive_mth(case: tuple[int, list[int]]) -> None:
    n, batches = case
    leaves = BIG_LEAVES[:n]
    store = MemoryHashStore()
    size = 0
    frontier: list[bytes] = []
    for count in [*batches, n - sum(batches)]:
        loaded = store.get_hashes(frontier_ids(size))
        assert loaded == frontier  # the frontier can be reloaded from storage
        nodes, frontier = append_leaves(size, loaded, leaves[size : size + count])
        for level, index, _ in nodes:
            assert (level, index) not in store  # nothing is rewritten
        store.add(nodes)
        size += count
        expected = mth(leaves[:size])
        assert root_from_frontier(size, frontier) == expected
        assert root(size, store) == expected
    # Exactly every complete subtree is stored: sum over levels of floor(n / 2**level).
    assert len(store) == sum(n >> level for level in range(max(n.bit_length(), 1)))


def test_frontier_ids() -> None:
    assert frontier_ids(0) == []
    assert frontier_ids(13) == [(3, 0), (2, 2), (0, 12)]
    assert frontier_ids(16) == [(4, 0)]


def test_append_rejects_bad_frontier() -> None:
    with pytest.raises(ValueError, match="frontier"):
        append_leaves(3, [EMPTY_ROOT], [leaf_hash(b"x")])
    with pytest.raises(ValueError, match="32 bytes"):
        append_leaves(0, [], [b"short"])


def test_store_refuses_rewrite() -> None:
    store = MemoryHashStore()
    store.add([(0, 0, EMPTY_ROOT)])
    store.add([(0, 0, EMPTY_ROOT)])
    with pytest.raises(ValueError, match="another hash"):
        store.add([(0, 0, leaf_hash(b""))])
    with pytest.raises(KeyError):
        store.get_hashes([(0, 1)])


# ----------------------------------------------------------------- proofs from the store


def test_all_proofs_small_trees() -> None:
    n = 65
    leaves = BIG_LEAVES[:n]
    for size in range(1, n + 1):
        for index in range(size):
            proof = inclusion_proof(index, size, BIG_STORE)
            assert proof == path(index, leaves[:size])
            verify_inclusion(leaves[index], index, size, proof, BIG_ROOTS[size])
        for old in range(1, size + 1):
            proof = consistency_proof(old, size, BIG_STORE)
            assert proof == subproof(old, leaves[:size], True)
            verify_consistency(old, size, BIG_ROOTS[old], BIG_ROOTS[size], proof)


def _flip(proof: list[bytes], which: int, bit: int) -> list[bytes]:
    out = list(proof)
    target = bytearray(out[which])
    target[bit // 8] ^= 1 << (bit % 8)
    out[which] = bytes(target)
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_inclusion_proofs_verify_and_tampering_fails(data: st.DataObject) -> None:
    size = data.draw(st.integers(min_value=1, max_value=BIG_N), label="size")
    index = data.draw(st.integers(min_value=0, max_value=size - 1), label="index")
    reader = CountingReader(BIG_STORE)
    proof = inclusion_proof(index, size, reader)
    assert reader.calls == (1 if proof else 0)
    assert reader.ids <= 2 * size.bit_length()  # O(log n) reads
    assert proof == path(index, BIG_LEAVES[:size])
    leaf = BIG_LEAVES[index]
    verify_inclusion(leaf, index, size, proof, BIG_ROOTS[size])

    if proof:
        which = data.draw(st.integers(min_value=0, max_value=len(proof) - 1), label="which")
        bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, _flip(proof, which, bit), BIG_ROOTS[size])
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, proof[:-1], BIG_ROOTS[size])
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, size, [*proof, EMPTY_ROOT], BIG_ROOTS[size])
    other = data.draw(
        st.integers(min_value=0, max_value=BIG_N).filter(lambda i: i != index), label="other"
    )
    with pytest.raises(ProofError):
        verify_inclusion(leaf, other, size, proof, BIG_ROOTS[size])
    # A checkpoint binds size and root together, so a wrong size comes with its own root.
    wrong = data.draw(
        st.integers(min_value=1, max_value=BIG_N).filter(lambda s: s != size), label="wrong"
    )
    with pytest.raises(ProofError):
        verify_inclusion(leaf, index, wrong, proof, BIG_ROOTS[wrong])
    with pytest.raises(ProofError):
        verify_inclusion(leaf_hash(b"not the entry"), index, size, proof, BIG_ROOTS[size])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_consistency_proofs_verify_and_tampering_fails(data: st.DataObject) -> None:
    new = data.draw(st.integers(min_value=1, max_value=BIG_N), label="new")
    old = data.draw(st.integers(min_value=1, max_value=new), label="old")
    reader = CountingReader(BIG_STORE)
    proof = consistency_proof(old, new, reader)
    assert reader.calls == (1 if proof else 0)
    assert reader.ids <= 2 * new.bit_length() + 1
    assert proof == subproof(old, BIG_LEAVES[:new], True)
    verify_consistency(old, new, BIG_ROOTS[old], BIG_ROOTS[new], proof)
    if old == new:
        assert proof == []
        return

    which = data.draw(st.integers(min_value=0, max_value=len(proof) - 1), label="which")
    bit = data.draw(st.integers(min_value=0, max_value=255), label="bit")
    with pytest.raises(ProofError):
        verify_consistency(old, new, BIG_ROOTS[old], BIG_ROOTS[new], _flip(proof, which, bit))
    with pytest.raises(ProofError):
        verify_consistency(old, new, BIG_ROOTS[old], BIG_ROOTS[new], proof[:-1])
    with pytest.raises(ProofError):
        verify_consistency(old, new, BIG_ROOTS[old], BIG_ROOTS[new], [*proof, EMPTY_ROOT])
    with pytest.raises(ProofError):
        verify_consistency(old, new, BIG_ROOTS[new], BIG_ROOTS[old], proof)
    wrong_old = data.draw(
        st.integers(min_value=0, max_value=BIG_N).filter(lambda s: s != old), label="wrong_old"
    )
    with pytest.raises(ProofError):
        verify_consistency(wrong_old, new, BIG_ROOTS[wrong_old], BIG_ROOTS[new], proof)
    wrong_new = data.draw(
        st.integers(min_value=0, max_value=BIG_N).filter(lambda s: s != new), label="wrong_new"
    )
    with pytest.raises(ProofError):
        verify_consistency(old, wrong_new, BIG_ROOTS[old], BIG_ROOTS[wrong_new], proof)


def test_proof_argument_errors() -> None:
    with pytest.raises(ValueError, match="index"):
        inclusion_proof(5, 5, BIG_STORE)
    with pytest.raises(ValueError, match="old_size"):
        consistency_proof(0, 5, BIG_STORE)
    with pytest.raises(ValueError, match="old_size"):
        consistency_proof(6, 5, BIG_STORE)
    with pytest.raises(KeyError):
        root(BIG_N + 1, BIG_STORE)
    assert root(0, BIG_STORE) == EMPTY_ROOT


def test_verifier_reasons() -> None:
    leaf = BIG_LEAVES[3]
    proof = inclusion_proof(3, 10, BIG_STORE)
    with pytest.raises(ProofError, match="beyond tree size"):
        verify_inclusion(leaf, 10, 10, proof, BIG_ROOTS[10])
    with pytest.raises(ProofError, match="wrong proof size"):
        verify_inclusion(leaf, 3, 10, proof[1:], BIG_ROOTS[10])
    with pytest.raises(ProofError, match="does not match"):
        verify_inclusion(leaf, 3, 10, proof, BIG_ROOTS[9])
    with pytest.raises(ProofError, match="2\\*\\*64"):
        verify_inclusion(leaf, 3, 2**64, proof, BIG_ROOTS[10])
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 10, EMPTY_ROOT, BIG_ROOTS[10], [])
    with pytest.raises(ProofError, match="roots differ"):
        verify_consistency(10, 10, BIG_ROOTS[10], BIG_ROOTS[9], [])
    with pytest.raises(ProofError, match="old root"):
        verify_consistency(6, 10, BIG_ROOTS[5], BIG_ROOTS[10], consistency_proof(6, 10, BIG_STORE))
