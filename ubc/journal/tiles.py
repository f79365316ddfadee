"""C2SP tlog-tiles: tile and entry-bundle paths, tile contents and bundle encoding.

A tile is a run of up to 256 consecutive hashes of one tree level: tile level ``L``
holds the Merkle tree hashes of tree level ``8 * L`` (tile height 8), so every hash in
it is an already stored complete subtree. Paths (relative to the log prefix) are
``tile/<L>/<N>[.p/<W>]`` and ``tile/entries/<N>[.p/<W>]``, where ``<N>`` is written in
zero-padded groups of three digits, all but the last prefixed with ``x``
(1234067 -> ``x001/x234/067``) and ``.p/<W>`` marks a partial tile of width ``W`` < 256.

Parsing is strict (only the canonical spelling of each tile is accepted) because the
HTTP layer maps request paths straight onto these functions and immutable, long-cached
responses must have exactly one URL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from ubc.journal.merkle import HASH_SIZE, HashReader, Node, NodeID, node_hash

__all__ = [
    "MAX_ENTRY_SIZE",
    "MAX_TILE_LEVEL",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "EntriesID",
    "TileID",
    "entries_path",
    "entry_bundle",
    "parse_entries_path",
    "parse_entry_bundle",
    "parse_tile",
    "parse_tile_path",
    "tile_bytes",
    "tile_counts",
    "tile_exists",
    "tile_node_ids",
    "tile_nodes",
    "tile_path",
]

TILE_HEIGHT = 8
"""Tree levels spanned by one tile."""

TILE_WIDTH = 1 << TILE_HEIGHT
"""Hashes (or entries) in a full tile or entry bundle: 256."""

MAX_TILE_LEVEL = 63
"""Largest tile level the spec allows in a path."""

MAX_ENTRY_SIZE = 0xFFFF
"""Entries are uint16 length-prefixed in bundles, so at most 65535 bytes."""

# Tile indices beyond uint64 cannot address a log; capping the group count also bounds
# the work a hostile path can cause.
_MAX_INDEX = 2**64 - 1

_LEVEL_RE = re.compile(r"0|[1-9][0-9]?", re.ASCII)
_WIDTH_RE = re.compile(r"[1-9][0-9]{0,2}", re.ASCII)
_GROUP_RE = re.compile(r"[0-9]{3}", re.ASCII)


class TileID(NamedTuple):
    """A Merkle tree tile: ``level``, index ``n``, ``width`` (None for a full tile)."""

    level: int
    n: int
    width: int | None


class EntriesID(NamedTuple):
    """An entry bundle: index ``n`` and ``width`` (None for a full bundle)."""

    n: int
    width: int | None


def _check_tile_args(n: int, width: int | None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_INDEX:
        raise ValueError(f"tile index must be an integer in [0, 2**64), got {n!r}")
    if width is not None and (
        isinstance(width, bool) or not isinstance(width, int) or not 0 < width < TILE_WIDTH
    ):
        raise ValueError(f"partial tile width must be in [1, {TILE_WIDTH - 1}], got {width!r}")


def _check_level(level: int) -> None:
    if isinstance(level, bool) or not isinstance(level, int):
        raise ValueError(f"tile level must be an integer, got {level!r}")
    if not 0 <= level <= MAX_TILE_LEVEL:
        raise ValueError(f"tile level must be in [0, {MAX_TILE_LEVEL}], got {level}")


def _encode_index(n: int) -> str:
    groups = [f"{n % 1000:03d}"]
    n //= 1000
    while n:
        groups.append(f"x{n % 1000:03d}")
        n //= 1000
    return "/".join(reversed(groups))


def _suffix(width: int | None) -> str:
    return "" if width is None else f".p/{width}"


def tile_path(level: int, n: int, width: int | None = None) -> str:
    """Path ``tile/<L>/<N>[.p/<W>]`` of a Merkle tree tile, relative to the log prefix."""
    _check_level(level)
    _check_tile_args(n, width)
    return f"tile/{level}/{_encode_index(n)}{_suffix(width)}"


def entries_path(n: int, width: int | None = None) -> str:
    """Path ``tile/entries/<N>[.p/<W>]`` of an entry bundle, relative to the log prefix."""
    _check_tile_args(n, width)
    return f"tile/entries/{_encode_index(n)}{_suffix(width)}"


def _parse_index_and_width(parts: list[str], path: str) -> tuple[int, int | None]:
    """Parse the ``<N>[.p/<W>]`` path elements (already split on ``/``)."""
    width: int | None = None
    if len(parts) >= 2 and parts[-2].endswith(".p"):
        if not _WIDTH_RE.fullmatch(parts[-1]):
            raise ValueError(f"malformed partial width in tile path {path!r}")
        width = int(parts[-1])
        if width >= TILE_WIDTH:
            raise ValueError(f"partial width {width} must be below {TILE_WIDTH} in {path!r}")
        parts = [*parts[:-2], parts[-2][:-2]]
    if not parts or len(parts) > 7:
        raise ValueError(f"malformed tile index in {path!r}")
    n = 0
    for i, group in enumerate(parts):
        last = i == len(parts) - 1
        digits = group if last else group.removeprefix("x")
        if (not last and not group.startswith("x")) or not _GROUP_RE.fullmatch(digits):
            raise ValueError(f"malformed tile index element {group!r} in {path!r}")
        n = n * 1000 + int(digits)
    if n > _MAX_INDEX:
        raise ValueError(f"tile index out of range in {path!r}")
    # Reject non-canonical spellings such as "x000/001": one URL per tile.
    if "/".join(parts) != _encode_index(n):
        raise ValueError(f"non-canonical tile index in {path!r}")
    return n, width


def _split(path: str, what: str) -> list[str]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"empty {what} path")
    parts = path.split("/")
    if parts[0] == "tile":
        parts = parts[1:]
    return parts


def parse_tile_path(path: str) -> TileID:
    """Parse ``<L>/<N>[.p/<W>]`` (optionally prefixed by ``tile/``) into a ``TileID``.

    Raises ``ValueError`` for anything that ``tile_path`` would not produce, including
    entry-bundle paths (use ``parse_entries_path`` for those).
    """
    parts = _split(path, "tile")
    if len(parts) < 2 or not _LEVEL_RE.fullmatch(parts[0]):
        raise ValueError(f"malformed tile level in {path!r}")
    level = int(parts[0])
    if level > MAX_TILE_LEVEL:
        raise ValueError(f"tile level {level} out of range in {path!r}")
    n, width = _parse_index_and_width(parts[1:], path)
    return TileID(level, n, width)


def parse_entries_path(path: str) -> EntriesID:
    """Parse ``entries/<N>[.p/<W>]`` (optionally prefixed by ``tile/``) into an ``EntriesID``.

    Raises ``ValueError`` for anything that ``entries_path`` would not produce.
    """
    parts = _split(path, "entry bundle")
    if len(parts) < 2 or parts[0] != "entries":
        raise ValueError(f"not an entry bundle path: {path!r}")
    n, width = _parse_index_and_width(parts[1:], path)
    return EntriesID(n, width)


def tile_exists(level: int, n: int, width: int | None, size: int) -> bool:
    """Whether a tree of ``size`` leaves contains the given tile (or entry bundle, level 0).

    A full tile exists once all its 256 hashes are complete; a partial tile of width ``W``
    once its first ``W`` hashes are. Servers answer 404 otherwise.
    """
    _check_level(level)
    _check_tile_args(n, width)
    if size < 0:
        raise ValueError("size must be non-negative")
    available = size >> (TILE_HEIGHT * level)  # complete hashes at tree level 8 * level
    return n * TILE_WIDTH + (TILE_WIDTH if width is None else width) <= available


def tile_counts(size: int) -> list[tuple[int, int, int]]:
    """``(level, full_tiles, partial_width)`` for every non-empty tile level of a tree.

    ``partial_width`` is 0 when the level has no partial tile. For example 70000 gives
    ``[(0, 273, 112), (1, 1, 17), (2, 0, 1)]``.
    """
    if size < 0:
        raise ValueError("size must be non-negative")
    out: list[tuple[int, int, int]] = []
    level = 0
    count = size
    while count:
        out.append((level, count // TILE_WIDTH, count % TILE_WIDTH))
        level += 1
        count //= TILE_WIDTH
    return out


def tile_node_ids(level: int, n: int, width: int | None) -> list[NodeID]:
    """Stored ``(tree_level, index)`` hashes concatenated by tile ``level``/``n``/``width``."""
    _check_level(level)
    _check_tile_args(n, width)
    count = TILE_WIDTH if width is None else width
    return [(TILE_HEIGHT * level, n * TILE_WIDTH + i) for i in range(count)]


def tile_bytes(level: int, n: int, width: int | None, reader: HashReader) -> bytes:
    """Contents of a tile: its hashes concatenated, read in one batch from ``reader``."""
    ids = tile_node_ids(level, n, width)
    hashes = reader.get_hashes(ids)
    if len(hashes) != len(ids) or any(len(h) != HASH_SIZE for h in hashes):
        raise ValueError("hash reader returned a malformed result for the tile")
    return b"".join(hashes)


def parse_tile(data: bytes, width: int | None = None) -> list[bytes]:
    """Split tile contents into hashes, checking there are ``width`` (None: 256) of them."""
    want = TILE_WIDTH if width is None else width
    if len(data) != want * HASH_SIZE:
        raise ValueError(f"tile of {len(data)} bytes is not {want} hashes")
    return [bytes(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def tile_nodes(level: int, n: int, hashes: Sequence[bytes]) -> list[Node]:
    """Every complete subtree inside a tile, as ``(tree_level, index, hash)`` nodes.

    A tile only carries the hashes of tree level ``8 * level``; a client holding tiles
    (for example the offline auditor) rebuilds the seven levels above them with this and
    can then compute any root or proof through a ``MemoryHashStore``. A full tile also
    yields its own root (tree level ``8 * (level + 1)``); a partial tile only the subtrees
    completed within it.
    """
    _check_level(level)
    width = len(hashes)
    if width == 0:
        raise ValueError("a tile holds at least one hash")
    _check_tile_args(n, None if width == TILE_WIDTH else width)
    base = TILE_HEIGHT * level
    row = [bytes(h) for h in hashes]
    if any(len(h) != HASH_SIZE for h in row):
        raise ValueError(f"tile hashes must be {HASH_SIZE} bytes")
    start = n * TILE_WIDTH
    nodes: list[Node] = [(base, start + i, h) for i, h in enumerate(row)]
    for height in range(1, TILE_HEIGHT + 1):
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)]
        if not row:
            break
        first = start >> height
        nodes.extend((base + height, first + i, h) for i, h in enumerate(row))
    return nodes


def entry_bundle(entries: Sequence[bytes]) -> bytes:
    """Encode an entry bundle: each entry as a big-endian uint16 length then its bytes."""
    if not 0 < len(entries) <= TILE_WIDTH:
        raise ValueError(f"a bundle holds 1..{TILE_WIDTH} entries, got {len(entries)}")
    out = bytearray()
    for i, entry in enumerate(entries):
        if len(entry) > MAX_ENTRY_SIZE:
            raise ValueError(f"entry {i} is {len(entry)} bytes, more than {MAX_ENTRY_SIZE}")
        out += len(entry).to_bytes(2, "big")
        out += entry
    return bytes(out)


def parse_entry_bundle(data: bytes, width: int | None = None) -> list[bytes]:
    """Decode an entry bundle holding ``width`` (None: a full bundle, 256) entries."""
    entries: list[bytes] = []
    pos = 0
    view = bytes(data)
    while pos < len(view):
        if pos + 2 > len(view):
            raise ValueError("entry bundle truncated inside a length prefix")
        length = int.from_bytes(view[pos : pos + 2], "big")
        pos += 2
        if pos + length > len(view):
            raise ValueError("entry bundle truncated inside an entry")
        entries.append(view[pos : pos + length])
        pos += length
        if len(entries) > TILE_WIDTH:
            raise ValueError(f"entry bundle holds more than {TILE_WIDTH} entries")
    want = TILE_WIDTH if width is None else width
    if len(entries) != want:
        raise ValueError(f"entry bundle has {len(entries)} entries, want {want}")
    return entries
