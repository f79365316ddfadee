"""RFC 6962 / RFC 9162 Merkle log: hashing, incremental append, proofs and verifiers.

Storage model: the server persists the hash of every *complete* subtree, keyed by
``(level, index)``; node ``(l, i)`` covers leaves ``[i * 2**l, (i + 1) * 2**l)`` and level 0
holds the leaf hashes. A complete subtree never changes once written, so the table is
append-only. Hashes of incomplete right-edge subtrees (the "ephemeral" nodes of a tree
whose size is not a power of two) are never stored: they are recomputed from their
complete pieces, at most O(log n) of them.

Everything here is pure (no database, no I/O): reads go through the ``HashReader``
protocol, with a single batched ``get_hashes`` call per root or proof so that a database
implementation can answer it with one query.

The verifiers follow RFC 9162 §2.1.3.2 and §2.1.4.2 and reproduce the accept/reject
behaviour of transparency-dev/merkle ``proof/verify.go`` (checked by its conformance
vectors in ``tests/testdata/merkle``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "HashReader",
    "MemoryHashStore",
    "Node",
    "NodeID",
    "ProofError",
    "append_leaves",
    "consistency_proof",
    "frontier_ids",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_frontier",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Size in bytes of every hash (SHA-256)."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""Root hash of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1)."""

# Tree sizes and indices are uint64 in every interoperable implementation (and in the
# conformance vectors, which probe 2**64 - 1); the verifiers reject anything larger.
_UINT64_MAX = 2**64 - 1

NodeID = tuple[int, int]
"""``(level, index)`` of a complete subtree."""

Node = tuple[int, int, bytes]
"""``(level, index, hash)`` of a complete subtree, as persisted."""


class ProofError(ValueError):
    """A Merkle proof (or its parameters) failed verification."""


def leaf_hash(entry: bytes) -> bytes:
    """Return the RFC 6962 leaf hash SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class HashReader(Protocol):
    """Read access to stored complete-subtree hashes."""

    def get_hashes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Return the hashes of ``ids`` (``(level, index)`` pairs) in the same order.

        Called once per root or proof so an implementation can batch the read; it must
        raise (for example ``KeyError``) if a node is missing rather than skip it.
        """
        ...


class MemoryHashStore:
    """In-memory ``HashReader`` used by tests and by the offline auditor."""

    def __init__(self) -> None:
        self._nodes: dict[NodeID, bytes] = {}

    def add(self, nodes: Iterable[Node]) -> None:
        """Store ``(level, index, hash)`` nodes, as returned by ``append_leaves``.

        Re-adding an identical node is a no-op; a different hash for an existing node is
        refused, because a complete subtree can never change in an append-only log.
        """
        for level, index, digest in nodes:
            if level < 0 or index < 0:
                raise ValueError(f"invalid node id ({level}, {index})")
            if len(digest) != HASH_SIZE:
                raise ValueError(f"node ({level}, {index}) hash must be {HASH_SIZE} bytes")
            key = (level, index)
            old = self._nodes.get(key)
            if old is not None and old != digest:
                raise ValueError(f"node ({level}, {index}) already stored with another hash")
            self._nodes[key] = bytes(digest)

    def get_hashes(self, ids: Sequence[NodeID]) -> list[bytes]:
        """Return the stored hashes of ``ids``; ``KeyError`` names the first missing one."""
        out: list[bytes] = []
        for key in ids:
            try:
                out.append(self._nodes[key])
            except KeyError:
                raise KeyError(f"node {key} is not stored") from None
        return out

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes


# --------------------------------------------------------------------------- helpers


def _check_size(value: int, name: str) -> None:
    # bool is an int subclass; a stray True must not pass as size 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (``n >= 2``): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _trailing_zeros(n: int) -> int:
    return (n & -n).bit_length() - 1


def _subtree_ids(begin: int, end: int) -> list[NodeID]:
    """Complete subtrees whose fold gives MTH(D[begin:end]), left to right.

    ``[begin, end)`` must be a subtree of the RFC recursion, i.e. ``begin`` is a multiple
    of the smallest power of two >= ``end - begin``. Its hash is then the right fold of
    the binary decomposition of its length: e.g. 13 leaves = 8 + 4 + 1.
    """
    length = end - begin
    if length <= 0 or begin % (1 << (length - 1).bit_length()) != 0:
        raise AssertionError(f"[{begin}, {end}) is not a Merkle subtree")
    ids: list[NodeID] = []
    for level in range(length.bit_length() - 1, -1, -1):
        if length >> level & 1:
            ids.append((level, begin >> level))
            begin += 1 << level
    return ids


def _fold(hashes: Sequence[bytes]) -> bytes:
    """Hash of a right-edge subtree from its complete pieces (largest first)."""
    acc = hashes[-1]
    for left in reversed(hashes[:-1]):
        acc = node_hash(left, acc)
    return acc


def _range_hashes(ranges: Sequence[tuple[int, int]], reader: HashReader) -> list[bytes]:
    """MTH of each ``[begin, end)`` in ``ranges`` with a single batched read."""
    pieces = [_subtree_ids(begin, end) for begin, end in ranges]
    unique = list(dict.fromkeys(node for piece in pieces for node in piece))
    if not unique:
        return []
    got = reader.get_hashes(unique)
    if len(got) != len(unique):
        raise ValueError(f"hash reader returned {len(got)} hashes for {len(unique)} ids")
    table = dict(zip(unique, got, strict=True))
    return [_fold([table[node] for node in piece]) for piece in pieces]


# --------------------------------------------------------------------------- append


def frontier_ids(size: int) -> list[NodeID]:
    """Ids of the perfect subtrees on the right border of a tree of ``size`` leaves.

    One per set bit of ``size``, largest (leftmost) first; loading their hashes gives the
    ``frontier`` that ``append_leaves`` and ``root_from_frontier`` take.
    """
    _check_size(size, "size")
    return [
        (level, (size >> level) - 1)
        for level in range(size.bit_length() - 1, -1, -1)
        if size >> level & 1
    ]


def _check_frontier(size: int, frontier: Sequence[bytes]) -> None:
    _check_size(size, "size")
    if len(frontier) != size.bit_count():
        raise ValueError(
            f"frontier of a tree of size {size} needs {size.bit_count()} hashes, "
            f"got {len(frontier)}"
        )
    for digest in frontier:
        if len(digest) != HASH_SIZE:
            raise ValueError(f"frontier hashes must be {HASH_SIZE} bytes")


def root_from_frontier(size: int, frontier: Sequence[bytes]) -> bytes:
    """Root hash of a tree of ``size`` leaves from its frontier (see ``frontier_ids``)."""
    _check_frontier(size, frontier)
    if size == 0:
        return EMPTY_ROOT
    return _fold(frontier)


def append_leaves(
    size: int, frontier: Sequence[bytes], leaf_hashes: Sequence[bytes]
) -> tuple[list[Node], list[bytes]]:
    """Append a batch of leaf hashes to a tree of ``size`` leaves without rehashing it.

    ``frontier`` holds the hashes of ``frontier_ids(size)``. Returns ``(new_nodes,
    new_frontier)``: every complete subtree completed by the batch as
    ``(level, index, hash)`` (leaves included, in creation order) to persist, and the
    frontier of the tree of ``size + len(leaf_hashes)`` leaves. Work is O(batch + log n)
    hashes and O(log n) state.
    """
    _check_frontier(size, frontier)
    stack = [bytes(h) for h in frontier]
    new_nodes: list[Node] = []
    for leaf in leaf_hashes:
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes")
        digest = bytes(leaf)
        level, index = 0, size
        new_nodes.append((0, index, digest))
        # Each set low bit of the old size is a perfect subtree of that level just left of
        # the new leaf: merge with it (like a binary counter carry) until a zero bit.
        while size >> level & 1:
            digest = node_hash(stack.pop(), digest)
            level += 1
            index >>= 1
            new_nodes.append((level, index, digest))
        stack.append(digest)
        size += 1
    return new_nodes, stack


# --------------------------------------------------------------------------- proofs


def root(size: int, reader: HashReader) -> bytes:
    """Root hash of the tree of the first ``size`` leaves, from stored hashes."""
    _check_size(size, "size")
    if size == 0:
        return EMPTY_ROOT
    return _range_hashes([(0, size)], reader)[0]


def inclusion_proof(index: int, size: int, reader: HashReader) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, D[0:size]): sibling hashes from the leaf upwards."""
    _check_size(index, "index")
    _check_size(size, "size")
    if index >= size:
        raise ValueError(f"index {index} is not below tree size {size}")
    siblings: list[tuple[int, int]] = []  # top-down
    begin, end = 0, size
    while end - begin > 1:
        mid = begin + _largest_pow2_below(end - begin)
        if index < mid:
            siblings.append((mid, end))
            end = mid
        else:
            siblings.append((begin, mid))
            begin = mid
    siblings.reverse()
    return _range_hashes(siblings, reader)


def consistency_proof(old_size: int, new_size: int, reader: HashReader) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(old_size, D[0:new_size]) = SUBPROOF(m, D[n], true).

    Requires ``0 < old_size <= new_size`` (a proof from the empty tree is meaningless and
    verifiers reject it); equal sizes give the empty proof.
    """
    _check_size(old_size, "old_size")
    _check_size(new_size, "new_size")
    if not 0 < old_size <= new_size:
        raise ValueError(f"need 0 < old_size <= new_size, got {old_size}, {new_size}")
    parts: list[tuple[int, int]] = []  # top-down, reversed below
    begin, end, whole = 0, new_size, True
    while True:
        if old_size == end:
            # SUBPROOF(m, D[0:m], b): nothing if b (the verifier knows that root),
            # else MTH(D[0:m]) itself.
            if not whole:
                parts.append((begin, end))
            break
        mid = begin + _largest_pow2_below(end - begin)
        if old_size <= mid:
            parts.append((mid, end))
            end = mid
        else:
            parts.append((begin, mid))
            begin, whole = mid, False
    parts.reverse()
    return _range_hashes(parts, reader)


# --------------------------------------------------------------------------- verifiers


def _check_uint64(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise ProofError(f"{name} must be an integer in [0, 2**64), got {value!r}")


def _check_proof_hashes(proof: Sequence[bytes]) -> None:
    for i, digest in enumerate(proof):
        if len(digest) != HASH_SIZE:
            raise ProofError(f"proof[{i}] has {len(digest)} bytes, want {HASH_SIZE}")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check an RFC 9162 §2.1.3.2 inclusion proof; raise ``ProofError`` if it fails."""
    _check_uint64(index, "index")
    _check_uint64(size, "size")
    if index >= size:
        raise ProofError(f"index {index} is beyond tree size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise ProofError(f"leaf hash has {len(leaf_hash)} bytes, want {HASH_SIZE}")
    _check_proof_hashes(proof)
    # Exact expected length, so a wrong-length proof gets a precise reason: hashes below
    # the point where the paths to `index` and `size - 1` diverge, plus one per left
    # sibling above it.
    inner = (index ^ (size - 1)).bit_length()
    want = inner + (index >> inner).bit_count()
    if len(proof) != want:
        raise ProofError(
            f"wrong proof size {len(proof)} for index {index}, size {size}, want {want}"
        )
    fn, sn, acc = index, size - 1, bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            raise ProofError("proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            acc = node_hash(p, acc)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            acc = node_hash(acc, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof is shorter than the path to the root")
    if acc != bytes(root):
        raise ProofError(
            f"calculated root {acc.hex()} does not match expected root {bytes(root).hex()}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check an RFC 9162 §2.1.4.2 consistency proof; raise ``ProofError`` if it fails.

    As in transparency-dev/merkle, ``old_size`` must be at least 1: every tree extends the
    empty tree, so such a "proof" would prove nothing and is rejected. Equal sizes need an
    empty proof and equal roots.
    """
    _check_uint64(old_size, "old_size")
    _check_uint64(new_size, "new_size")
    if new_size < old_size:
        raise ProofError(f"new size {new_size} is smaller than old size {old_size}")
    if old_size == 0:
        raise ProofError("consistency proof from an empty tree is meaningless")
    if old_size == new_size:
        if proof:
            raise ProofError("sizes are equal but the proof is not empty")
        if bytes(old_root) != bytes(new_root):
            raise ProofError("sizes are equal but the roots differ")
        return
    if not proof:
        raise ProofError("empty consistency proof for different sizes")
    _check_proof_hashes(proof)
    shift = _trailing_zeros(old_size)
    power_of_two = old_size == 1 << shift
    fork = ((old_size - 1) ^ (new_size - 1)).bit_length()
    want = (0 if power_of_two else 1) + (fork - shift) + ((old_size - 1) >> fork).bit_count()
    if len(proof) != want:
        raise ProofError(
            f"wrong proof size {len(proof)} for sizes {old_size} -> {new_size}, want {want}"
        )
    path = [bytes(old_root), *proof] if power_of_two else [bytes(h) for h in proof]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = fe = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            fe = node_hash(c, fe)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            fe = node_hash(fe, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof is shorter than the path to the root")
    if fr != bytes(old_root):
        raise ProofError(f"calculated old root {fr.hex()} does not match {bytes(old_root).hex()}")
    if fe != bytes(new_root):
        raise ProofError(f"calculated new root {fe.hex()} does not match {bytes(new_root).hex()}")
