"""Where a journal comes from: an export file, a server, or a database; and exporting one.

An export is JSON lines: a header ``{"format", "origin", "size", "checkpoint"}`` then one
``{"seq", "entry"}`` line per entry (the entry's exact bytes in base64), so that it can
be written and read in constant memory.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import orjson
from sqlalchemy import select

from ubc.db import make_engine, make_session_factory, table
from ubc.journal import store
from ubc.journal.models import JournalEntry

FORMAT = "ubc-journal/v1"
PAGE = 1000

entries_t = table(JournalEntry)


@dataclass(frozen=True, slots=True)
class Journal:
    """A journal to verify: its latest signed checkpoint and a stream of (label, bytes)."""

    checkpoint: str
    size: int
    entries: Iterator[tuple[int, bytes]]
    #: An export file's path: its entry lines can then be read in blocks and decoded
    #: where they are checked (:func:`export_blocks`, :func:`parse_export_line`).
    export: Path | None = None


class SourceError(RuntimeError):
    """The journal could not be read."""


def open_source(location: str, *, token: str | None = None, cosigned: bool = False) -> Journal:
    """An export file path, an ``http(s)://`` server URL, or a database URL. ``cosigned``:
    a server's journal under the largest checkpoint its witnesses cosigned (see
    :func:`from_server`); ignored for the other sources."""
    if location.startswith(("http://", "https://")):
        return from_server(location, token=token, cosigned=cosigned)
    if "://" in location and not Path(location).exists():
        return from_database(location)
    return from_export(Path(location))


def from_export(path: Path) -> Journal:
    try:
        with path.open("r", encoding="utf-8") as handle:
            header = _header(handle.readline(), path)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    return Journal(header["checkpoint"], int(header["size"]), _export_entries(path), path)


def from_server(url: str, *, token: str | None = None, cosigned: bool = False) -> Journal:
    """A live server's journal: its latest checkpoint (``cosigned``: the largest one a
    quorum of its witnesses cosigned, ``GET /journal/checkpoint/cosigned``) and the entries
    that checkpoint covers. A live ledger goes on writing while it is read; what it appends
    after the checkpoint is under a later checkpoint, not part of this audit."""
    path = "/journal/checkpoint/cosigned" if cosigned else "/journal/checkpoint"
    try:
        with _server_client(url, token) as client:
            checkpoint = client.get(path)
            if cosigned and checkpoint.status_code == 404:
                raise SourceError(
                    f"{url} serves no cosigned checkpoint yet (GET {path}: 404): its witnesses "
                    "have not cosigned one, or it has none configured"
                )
            checkpoint.raise_for_status()
    except httpx.HTTPError as exc:
        raise SourceError(f"cannot read the checkpoint of {url}: {exc}") from None
    size = int(checkpoint.text.split("\n")[1])
    return Journal(checkpoint.text, size, _server_entries(url, token, size))


def _server_client(url: str, token: str | None) -> httpx.Client:
    return httpx.Client(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Bearer {token}"} if token else {},
        timeout=60,
    )


def from_database(url: str) -> Journal:
    engine = make_engine(url, readonly=True)
    try:
        with make_session_factory(engine)() as session:
            size, checkpoint = store.latest_checkpoint(session)
    finally:
        engine.dispose()
    return Journal(checkpoint, size, _database_entries(url))


def write_export(journal: Journal, out: IO[str], *, origin: str) -> int:
    """Write ``journal`` as an export; returns the number of entries written."""
    header = {
        "format": FORMAT,
        "origin": origin,
        "size": journal.size,
        "checkpoint": journal.checkpoint,
    }
    out.write(json.dumps(header) + "\n")
    count = 0
    for seq, entry in journal.entries:
        out.write(json.dumps({"seq": seq, "entry": base64.b64encode(entry).decode()}) + "\n")
        count += 1
    return count


def _header(line: str, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except json.JSONDecodeError:
        raise SourceError(f"{path} is not a ubc journal export") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SourceError(f"{path} is not a {FORMAT} export")
    return header


def _export_entries(path: Path) -> Iterator[tuple[int, bytes]]:
    for number, blob in export_blocks(path, 1):
        yield parse_export_line(blob.strip(), path, number)


def export_blocks(path: Path, lines: int, *, skip: int = 0) -> Iterator[tuple[int, bytes]]:
    """The entry lines of an export in blocks of up to ``lines`` non-blank lines (blank
    lines inside a block kept, so that line numbers count), each with the file line number
    of its first line; ``skip`` entry lines are left out first. The file is opened only
    when the blocks are read, and closed when they stop."""
    with path.open("rb") as handle:
        handle.readline()
        number = 1
        block: list[bytes] = []
        first = entries = 0
        for line in handle:
            number += 1
            blank = not line.strip()
            if not block and (blank or skip):
                skip -= not blank
                continue
            if not block:
                first = number
            block.append(line)
            entries += not blank
            if entries >= lines:
                yield first, b"".join(block)
                block, entries = [], 0
        if entries:
            yield first, b"".join(block)


def export_ranges(path: Path, size: int, *, skip: int = 0) -> Iterator[tuple[int, int, int]]:
    """The entry lines of an export as byte ranges of whole lines, about ``size`` bytes
    each: (the file line number of the range's first line, its offset, its length).
    ``skip`` non-blank entry lines are left out first. Whoever checks a range reads it
    from the file itself (:func:`read_range`): the lines are not copied between processes.
    """
    with path.open("rb") as handle:
        handle.readline()
        number = 1  # the line last read
        while skip:
            line = handle.readline()
            if not line:
                return
            number += 1
            skip -= bool(line.strip())
        offset = handle.tell()
        while True:
            data = handle.read(size)
            if not data:
                return
            if not data.endswith(b"\n"):
                data += handle.readline()
            yield number + 1, offset, len(data)
            number += data.count(b"\n")
            offset += len(data)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of the file at ``path`` from ``offset``; SourceError when the file
    has fewer (it changed while it was read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None
    if len(data) != length:
        raise SourceError(f"{path} changed while it was read")
    return data


def parse_export_line(line: bytes, path: Path | str, number: int) -> tuple[int, bytes]:
    """One entry line of an export: (seq, the entry's exact bytes); SourceError otherwise.

    The line is read with orjson, which takes a fraction of json's time on the long base64
    string; json reads it when orjson refuses it or when its ``seq`` is not an integer
    (orjson reads integers beyond 64 bits as floats, which ``int()`` would round), so the
    result is always the one json gives.
    """
    try:
        try:
            item = orjson.loads(line)
            if type(item) is not dict or type(item.get("seq")) is not int:
                raise ValueError("not for orjson")
        except ValueError:
            item = json.loads(line)
        return int(item["seq"]), base64.b64decode(item["entry"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{path}:{number}: not an entry line") from None


def _server_entries(url: str, token: str | None, size: int) -> Iterator[tuple[int, bytes]]:
    # The client is opened only when the entries are read, and closed when they stop.
    client = _server_client(url, token)
    try:
        start = 0
        # Up to the checkpoint's size: a live ledger appends meanwhile, under later
        # checkpoints (an export or a database is read to its end: there, entries beyond
        # the checkpoint are a finding).
        while start < size:
            end = min(start + PAGE, size)
            response = client.get("/journal/entries", params={"start": start, "end": end})
            if response.status_code != 200:
                raise SourceError(f"GET /journal/entries: {response.status_code} {response.text}")
            items = response.json()["entries"]
            if not items:
                return
            for item in items:
                if "entry" not in item:
                    raise SourceError("this token may not read every entry: use an auditor token")
                yield int(item["seq"]), base64.b64decode(item["entry"])
            start = end
    finally:
        client.close()


def _database_entries(url: str) -> Iterator[tuple[int, bytes]]:
    engine = make_engine(url, readonly=True)
    try:
        with engine.connect() as connection:
            last = -1
            while True:
                rows = connection.execute(
                    select(entries_t.c.seq, entries_t.c.entry)
                    .where(entries_t.c.seq > last)
                    .order_by(entries_t.c.seq)
                    .limit(PAGE)
                ).all()
                if not rows:
                    return
                for seq, entry in rows:
                    yield int(seq), bytes(entry)
                last = int(rows[-1].seq)
    finally:
        engine.dispose()
