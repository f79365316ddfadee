"""Decoding and signature checks of journal entries, in worker processes.

The main process reads the journal and applies entries in order; each worker takes a
chunk of raw entries (or a byte range of an export, which it reads and decodes itself)
and returns, per entry, its Merkle leaf hash, the fields of the
entry the replay needs, the strictly decoded envelope (or its error), and the keyids
whose signatures verified. A worker knows the keys the main process sent it (every key
it had learned when the chunk was sent) and the keys the chunk's own payloads introduce;
a signature under a key it does not know yet is left for the main process to check.
Keys are content-addressed (a keyid is the hash of its key), so any source of a key is
as good as another: whether it may sign is the rules' business.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import queue
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any, cast

from ubc.audit.source import SourceError, parse_export_line, read_range
from ubc.envelopes import service as envelopes
from ubc.envelopes.payloads import PAYLOAD_MODELS
from ubc.errors import UbcError
from ubc.journal.merkle import leaf_hash
from ubc.ledger.engine import Effect
from ubc.signing import decode_public_key, key_id, verified_keyids

#: (label, leaf hash, what the entry is): ``("error", message)`` for an entry that is
#: not a journal entry, else :data:`Fields`. Entry 0 (genesis) the main process reads.
#: Plain tuples, strings and bytes: what is cheapest to send between processes.
Item = tuple[int, bytes, Any]
#: (seq, committed_at, effects as recorded (parsed JSON, or a tuple of ``Effect``: see
#: :func:`compact_effects`), summary, kind, decoded or the decoding error).
Fields = tuple[Any, Any, Any, Any, str, "Decoded | UbcError"]
#: (type, payload, payload hash, payload type, payload bytes and ((keyid, sig), ...) (both
#: bytes empty when every signature was checked here), id hash, keyids verified).
Decoded = tuple[str, Any, bytes, str, bytes, tuple[tuple[str, bytes], ...], int, tuple[str, ...]]


_KEYS: dict[str, bytes] = {}
#: Chunks between two runs of the cycle collector in a worker (and in the main loop).
GC_EVERY = 64


#: What a worker is sent: (label, entry bytes) pairs, a block of an export's entry lines
#: as (the export's name, the line number of the first, the lines), or such a block as a
#: byte range of the export that the worker reads: (its path, the line number of the
#: first line, offset, length).
Chunk = Sequence[tuple[int, bytes]] | tuple[str, int, bytes] | tuple[str, int, int, int]


def check_chunk(chunk: Chunk) -> list[Item]:
    out: list[Item] = []
    keys = _KEYS
    if isinstance(chunk, tuple) and chunk and isinstance(chunk[0], str):
        block = cast(tuple[str, int, bytes] | tuple[str, int, int, int], chunk)
        name, number = block[0], block[1]
        blob = block[2] if len(block) == 3 else read_range(name, block[2], block[3])
        entries = [
            parse_export_line(line, name, number + i)
            for i, line in enumerate(blob.split(b"\n"))
            if line.strip()
        ]
    else:
        entries = list(cast(Sequence[tuple[int, bytes]], chunk))
    for label, entry in entries:
        leaf = leaf_hash(entry)
        try:
            body = json.loads(entry)
            seq, committed_at, effects = body["seq"], body["committed_at"], body["effects"]
            envelope_json = body["envelope"]
        except (ValueError, KeyError, TypeError) as exc:
            out.append((label, leaf, ("error", str(exc))))
            continue
        summary = body.get("summary")
        kind = _type_of(envelope_json)
        try:
            decoded = envelopes._decode(0, envelope_json)
        except UbcError as error:
            error.__traceback__ = None  # sent as it is: no frames to keep alive
            out.append((label, leaf, (seq, committed_at, effects, summary, kind, error)))
            continue
        payload = decoded.payload
        fields = payload.__dict__
        for name in ("public_key", "new_public_key"):
            value = fields.get(name)
            if isinstance(value, str):
                try:
                    public = decode_public_key(value)
                    keys[key_id(public)] = public
                except ValueError:
                    pass
        envelope = decoded.envelope
        wanted: dict[str, bytes] = {}
        for signature in envelope.signatures:
            known = keys.get(signature.keyid)
            if known is not None:
                wanted[signature.keyid] = known
        verified = tuple(verified_keyids(envelope, wanted)) if wanted else ()
        checked_all = len(verified) == len(envelope.signatures)
        item: Decoded = (
            decoded.type,
            payload,
            decoded.payload_hash,
            envelope.payload_type,
            b"" if checked_all else envelope.payload,
            # The signatures' bytes only when the main process checks some of them.
            tuple((sig.keyid, b"" if checked_all else sig.sig) for sig in envelope.signatures),
            id_hash(payload.id),
            verified,
        )
        recorded = compact_effects(effects)
        out.append((label, leaf, (seq, committed_at, recorded, summary, kind, item)))
    return out


def compact_effects(effects: Any) -> Any:
    """Recorded effects as a tuple of :class:`Effect` when each is an object with exactly
    an effect's fields (``pending_id`` only when not null): cheaper to send and to
    compare, and equal to the derived effects exactly when the objects equal their
    ``to_json()``. Anything else (and no effects) as it is."""
    if type(effects) is not list or not effects:
        return effects
    out = []
    for e in effects:
        if type(e) is not dict:
            return effects
        size = len(e)
        pending = e.get("pending_id") if size == 8 else None
        if not (size == 7 or (size == 8 and pending is not None)):
            return effects
        try:
            out.append(
                Effect(e["transfer_id"], e["kind"], e["debit"], e["credit"], e["asset"],
                       e["amount"], e["phase"], pending)
            )  # fmt: skip
        except KeyError:
            return effects
    return tuple(out)


def effects_json(effects: Any) -> Any:
    """The recorded effects as they were read (the inverse of :func:`compact_effects`)."""
    if type(effects) is tuple:
        return [e.to_json() for e in effects]
    return effects


def id_hash(text: str) -> int:
    """A 64-bit hash of an id, never 0 (the id table's empty slot)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


def _type_of(envelope_json: Any) -> str:
    payload_type = (
        str(envelope_json.get("payloadType", "")) if isinstance(envelope_json, dict) else ""
    )
    return payload_type.removeprefix("application/vnd.ubc.").removesuffix("+json") or "unknown"


def _serve(inbox: Any, outbox: Any) -> None:
    # What a chunk allocates is freed by reference counting; the cycle collector would
    # only rescan the same long-lived objects thousands of times (about a fifth of the
    # work). It runs once per GC_EVERY chunks instead.
    gc.freeze()
    gc.disable()
    chunks = 0
    while True:
        chunks += 1
        if chunks % GC_EVERY == 0:
            gc.collect()
        task = inbox.get()
        if task is None:
            return
        keys, chunk = task
        _KEYS.update(keys)
        try:
            outbox.put(check_chunk(chunk))
        except SourceError as exc:  # an export line that is not an entry: as read in order
            outbox.put(exc)
        except Exception as exc:  # the main process raises it
            outbox.put(WorkerError(f"{type(exc).__name__}: {exc}"))


# Payloads cross between processes as (class, field values, fields set): pydantic's own
# pickling (__getstate__/__setstate__ and a state dict) costs about twice as much on both
# sides. The rebuilt object is what __setstate__ would make: the same four attributes.
_new = object.__new__
_set = object.__setattr__


def _payload(cls: type[Any], values: dict[str, Any], fields: tuple[str, ...]) -> Any:
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(fields))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


def _reduce_payload(payload: Any) -> Any:
    if payload.__pydantic_extra__ is None and payload.__pydantic_private__ is None:
        return _payload, (type(payload), payload.__dict__, tuple(payload.__pydantic_fields_set__))
    return payload.__reduce_ex__(pickle.HIGHEST_PROTOCOL)


# Only the queues' pickler (multiprocessing's), not pickle in general.
for _model in set(PAYLOAD_MODELS.values()):
    ForkingPickler.register(_model, _reduce_payload)


class WorkerError(RuntimeError):
    """A worker process failed on a chunk, or died."""


class Pool:
    """Worker processes, each with its own queues, so that each is sent the keys it
    has not had yet and results come back in the order chunks were sent."""

    def __init__(self, workers: int | None = None) -> None:
        count = workers or max(1, len(os.sched_getaffinity(0)))
        context = mp.get_context("fork")
        # Queues with feeder threads: a put never blocks on a full pipe, so neither side
        # can wait on the other while both send.
        self.inboxes: list[Any] = [context.Queue() for _ in range(count)]
        self.outboxes: list[Any] = [context.Queue() for _ in range(count)]
        self.processes: list[BaseProcess] = []
        for inbox, outbox in zip(self.inboxes, self.outboxes, strict=True):
            process = context.Process(target=_serve, args=(inbox, outbox), daemon=True)
            process.start()
            self.processes.append(process)
        self.sent_keys = [0] * count
        self.sent = 0
        self.received = 0

    def send(self, keys: list[tuple[str, bytes]], chunk: Chunk) -> None:
        worker = self.sent % len(self.processes)
        delta = keys[self.sent_keys[worker] :]
        self.sent_keys[worker] = len(keys)
        self.inboxes[worker].put((delta, chunk))
        self.sent += 1

    def receive(self) -> list[Item]:
        worker = self.received % len(self.processes)
        self.received += 1
        while True:
            try:
                result = self.outboxes[worker].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.processes[worker].is_alive():
                    raise WorkerError(f"worker {worker} died") from None
        if isinstance(result, WorkerError | SourceError):
            raise result
        items: list[Item] = result
        return items

    @property
    def waiting(self) -> int:
        return self.sent - self.received

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for box in (*self.inboxes, *self.outboxes):
            box.close()
            box.cancel_join_thread()
