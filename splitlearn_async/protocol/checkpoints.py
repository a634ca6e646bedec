"""Checkpoints in chunks: blob declarations, ``chunk`` messages and their reassembly, both ways.

A checkpoint (the safetensors bytes of trained weights and of an optimizer state) can be
larger than one message may be: SmolLM2's trunk alone is about 340 MB. So it travels as
a **header** that declares each blob, then **chunk** messages (see ``docs/protocol.md``)::

    header   {..., "chunk_bytes": C, "weights": {"bytes": N, "sha256": "<64 hex>"},
                                     "optimizer_state": {"bytes": M, "sha256": ...}}
    chunk    {"kind": "chunk", "blob": "weights", "offset": 0, "data": <C bytes>}
    chunk    {"kind": "chunk", "blob": "weights", "offset": C, "data": <C bytes>}
    ...      every chunk carries C bytes, the last one of a blob the rest
    chunk    {"kind": "chunk", "blob": "optimizer_state", "offset": 0, ...}

Blobs travel in the order of :data:`BLOB_NAMES` (weights first), each in order, each
chunk once. :class:`BlobAssembler` is the one reader of such a stream, for the server
(``TrainOpen``, ``LoadAdapter``) and for the client (``TrainSave``): it checks every
chunk as it arrives (blob, offset, size), hashes it, and checks each blob's length and
sha256 when it is complete. :func:`chunk_bodies` is the one writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitlearn_async.errors import WireError
from splitlearn_async.wire import Kind, check_keys, field, message_kind, pack

__all__ = [
    "BLOB_NAMES",
    "CHUNK_OVERHEAD",
    "DEFAULT_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "Blob",
    "BlobAssembler",
    "Chunk",
    "blob_fields",
    "build_chunk",
    "check_chunk_bytes",
    "chunk_bodies",
    "default_chunk_bytes",
    "describe_blobs",
    "parse_blobs",
    "parse_chunk",
]

#: The blobs a checkpoint may carry, in the order they travel.
BLOB_NAMES = ("weights", "optimizer_state")
#: Bytes of a ``chunk`` message besides its data (its keys, the blob's name, the offset).
CHUNK_OVERHEAD = 128
#: The smallest ``chunk_bytes`` accepted (each message costs a call's worth of work).
MIN_CHUNK_BYTES = 512
#: The chunk size used when the message limit allows it: large enough that the messages
#: cost little, small enough that no one message holds up the event loop.
DEFAULT_CHUNK_BYTES = 4 << 20
#: Declared blob sizes above this are refused before any cap of the receiver is consulted.
_MAX_BLOB_BYTES = 1 << 46

_CHUNK_FIELDS = frozenset({"kind", "blob", "offset", "data"})
_BLOB_FIELDS = frozenset({"bytes", "sha256"})
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Blob:
    """One declared blob of a checkpoint.

    Attributes:
        name: ``"weights"`` or ``"optimizer_state"``.
        size: Its length in bytes (>= 1).
        sha256: The SHA-256 of its bytes, 64 lowercase hex digits.
    """

    name: str
    size: int
    sha256: str

    def to_wire(self) -> dict[str, Any]:
        """The blob's declaration in a header: ``{"bytes": size, "sha256": hex}``."""
        return {"bytes": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Chunk:
    """A parsed ``chunk`` message: ``data`` of blob ``blob`` starting at byte ``offset``."""

    blob: str
    offset: int
    data: bytes


def default_chunk_bytes(max_message_bytes: int) -> int:
    """The chunk size for messages of at most ``max_message_bytes``: 4 MiB, or less to fit."""
    return max(MIN_CHUNK_BYTES, min(DEFAULT_CHUNK_BYTES, max_message_bytes - CHUNK_OVERHEAD))


def check_chunk_bytes(value: int, max_message_bytes: int | None) -> int:
    """Check a declared ``chunk_bytes``: at least :data:`MIN_CHUNK_BYTES`, and a chunk must fit a message.

    Raises:
        WireError: the value is out of range.
    """
    most = None if max_message_bytes is None else max_message_bytes - CHUNK_OVERHEAD
    if value < MIN_CHUNK_BYTES or (most is not None and value > most):
        limit = f" and at most {most} (max_message_bytes={max_message_bytes} less {CHUNK_OVERHEAD} bytes of framing)"
        raise WireError(
            f"message field 'chunk_bytes' is {value}; it must be at least {MIN_CHUNK_BYTES}"
            f"{limit if most is not None else ''}; send smaller chunks (ClientConfig.chunk_bytes)."
        )
    return value


def describe_blobs(blobs: Mapping[str, bytes | bytearray | memoryview | None]) -> list[Blob]:
    """The declarations of the non-empty ``blobs``, in travel order, with their SHA-256.

    Hashing reads every byte (about 1 s per GB): call it off the event loop for large blobs.

    Raises:
        WireError: a blob's name is not one of :data:`BLOB_NAMES`.
    """
    unknown = sorted(set(blobs) - set(BLOB_NAMES))
    if unknown:
        raise WireError(f"a checkpoint carries only {', '.join(BLOB_NAMES)}, not {', '.join(unknown)}.")
    out = []
    for name in BLOB_NAMES:
        data = blobs.get(name)
        if data is not None and len(data):
            view = memoryview(data)
            out.append(Blob(name, view.nbytes, hashlib.sha256(view).hexdigest()))
    return out


def blob_fields(blobs: Sequence[Blob], chunk_bytes: int | None) -> dict[str, Any]:
    """The header fields that declare ``blobs`` (none at all when there are no blobs)."""
    if not blobs:
        return {}
    return {"chunk_bytes": int(chunk_bytes or DEFAULT_CHUNK_BYTES), **{b.name: b.to_wire() for b in blobs}}


def parse_blobs(
    msg: Mapping[str, Any], names: Sequence[str], *, max_message_bytes: int | None = None
) -> tuple[list[Blob], int | None]:
    """The blobs a header declares under ``names`` (in travel order), and its ``chunk_bytes``.

    Returns:
        ``(blobs, chunk_bytes)``; ``chunk_bytes`` is None when no blob is declared.

    Raises:
        WireError: a declaration is not ``{"bytes": int >= 1, "sha256": 64 hex digits}``,
            ``chunk_bytes`` is missing or out of range, or given without a blob.
    """
    blobs = []
    for name in BLOB_NAMES:
        if name not in names or msg.get(name) is None:
            continue
        label = f"message field {name!r}"
        if isinstance(msg[name], (bytes, bytearray)):
            raise WireError(
                f"{label} carries the bytes themselves; declare it as {{'bytes': n, 'sha256': hex}} and send the "
                "bytes in chunk messages after this one (docs/protocol.md, Checkpoints in chunks)."
            )
        spec = field(msg, name, dict, name=label)
        check_keys(spec, _BLOB_FIELDS, f"the declaration of {name!r}")
        size = field(spec, "bytes", int, name=f"{label}.bytes")
        if not 0 < size <= _MAX_BLOB_BYTES:
            raise WireError(f"{label}.bytes is {size}; declare the blob's length in bytes (>= 1), or leave it out.")
        digest = field(spec, "sha256", str, name=f"{label}.sha256")
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise WireError(
                f"{label}.sha256 must be the blob's SHA-256 as 64 lowercase hex digits, got {digest[:80]!r}."
            )
        blobs.append(Blob(name, size, digest))
    chunk_bytes = field(msg, "chunk_bytes", int, required=bool(blobs))
    if chunk_bytes is not None and not blobs:
        raise WireError("message field 'chunk_bytes' is given but no blob is declared; leave it out.")
    if chunk_bytes is not None:
        check_chunk_bytes(chunk_bytes, max_message_bytes)
    return blobs, chunk_bytes


def build_chunk(blob: str, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """The body of one ``chunk`` message: ``data`` of ``blob`` from byte ``offset``."""
    return pack({"kind": Kind.CHUNK.value, "blob": blob, "offset": int(offset), "data": data})


def chunk_bodies(
    blobs: Sequence[Blob], data: Mapping[str, bytes | bytearray | memoryview | None], chunk_bytes: int
) -> Iterator[bytes]:
    """The ``chunk`` messages of ``blobs`` (declared by :func:`describe_blobs`), made one at a time.

    Each body copies its slice once; the blobs themselves are never copied whole.
    """
    for blob in blobs:
        view = memoryview(data[blob.name] or b"")
        for offset in range(0, blob.size, chunk_bytes):
            yield build_chunk(blob.name, offset, view[offset : offset + chunk_bytes])


def parse_chunk(msg: Mapping[str, Any]) -> Chunk:
    """Parse a decoded ``chunk`` message (its place in the stream is :class:`BlobAssembler`'s to check).

    Raises:
        WireError: it is not a ``chunk``, has unknown fields, or a field is missing or mistyped.
    """
    message_kind(msg, expected=Kind.CHUNK)
    check_keys(msg, _CHUNK_FIELDS, "a chunk message")
    blob = field(msg, "blob", str)
    offset = field(msg, "offset", int)
    data = field(msg, "data", bytes)
    return Chunk(blob, offset, bytes(data))


class BlobAssembler:
    """Checks a stream of chunks against its header and puts the blobs back together.

    Every chunk must name the blob being sent (blobs in declaration order), start where
    the previous one ended, and carry ``chunk_bytes`` bytes (the last one of a blob: the
    rest). Each blob's SHA-256 is computed as its chunks arrive and checked when it is
    complete. Hashing a chunk costs about 1 ms per MiB: feed large ones from a thread.

    Args:
        blobs: The declared blobs, in travel order.
        chunk_bytes: The declared chunk size.
        keep: Keep the chunks to hand back whole blobs from :meth:`take`; False only checks
            (the caller stores each chunk itself, e.g. writes it to a file).
    """

    def __init__(self, blobs: Sequence[Blob], chunk_bytes: int, *, keep: bool = True) -> None:
        self.blobs = list(blobs)
        self.chunk_bytes = chunk_bytes
        self.chunks = 0  #: chunks accepted so far
        self._keep = keep
        self._index = 0  # the blob being received
        self._received = 0  # its bytes so far
        self._hash = hashlib.sha256()
        self._parts: dict[str, list[bytes]] = {b.name: [] for b in self.blobs}

    @property
    def complete(self) -> bool:
        """True once every declared blob has arrived whole and matched its SHA-256."""
        return self._index == len(self.blobs)

    @property
    def total_bytes(self) -> int:
        """The declared bytes of all blobs."""
        return sum(b.size for b in self.blobs)

    def add(self, chunk: Chunk) -> Blob | None:
        """Accept the next chunk; returns its blob when this chunk completed it.

        Raises:
            WireError: the chunk is out of place (another blob, another offset: out of order
                or sent twice), of the wrong size, arrives after the last blob, or completes a
                blob whose SHA-256 differs from the declared one.
        """
        if self.complete:
            raise WireError(
                f"a chunk of {chunk.blob!r} arrived after every declared blob was complete; end the stream there."
            )
        blob = self.blobs[self._index]
        if chunk.blob != blob.name:
            raise WireError(
                f"a chunk of {chunk.blob!r} arrived while {blob.name!r} has {self._received} of {blob.size} bytes; "
                f"send the blobs one after another in the declared order ({', '.join(b.name for b in self.blobs)})."
            )
        if chunk.offset != self._received:
            raise WireError(
                f"a chunk of {blob.name!r} at offset {chunk.offset} arrived where offset {self._received} was "
                "expected; send each chunk once, in order."
            )
        expected = min(self.chunk_bytes, blob.size - self._received)
        if len(chunk.data) != expected:
            raise WireError(
                f"the chunk of {blob.name!r} at offset {chunk.offset} carries {len(chunk.data)} bytes, expected "
                f"{expected}: every chunk carries chunk_bytes={self.chunk_bytes} bytes, the last one of a blob the rest."
            )
        self._hash.update(chunk.data)
        if self._keep:
            self._parts[blob.name].append(chunk.data)
        self._received += len(chunk.data)
        self.chunks += 1
        if self._received < blob.size:
            return None
        digest = self._hash.hexdigest()
        if digest != blob.sha256:
            self._parts.clear()
            raise WireError(
                f"{blob.name!r} arrived whole ({blob.size} bytes) but its SHA-256 is {digest}, not the declared "
                f"{blob.sha256}: the bytes were changed on the way; send the checkpoint again."
            )
        self._index += 1
        self._received = 0
        self._hash = hashlib.sha256()
        return blob

    def check_complete(self) -> None:
        """Raise unless every blob has arrived (call it where the stream ended).

        Raises:
            WireError: the stream ended early, naming the blob and the bytes that arrived.
        """
        if not self.complete:
            blob = self.blobs[self._index]
            raise WireError(
                f"the stream ended after {self._received} of the {blob.size} bytes of {blob.name!r} "
                f"({self.chunks} chunks in all); it was cut short: send every chunk, then end the stream."
            )

    def take(self) -> dict[str, bytes]:
        """The whole blobs (joined once; the chunks are dropped), after :meth:`check_complete`.

        Raises:
            WireError: the stream ended early.
        """
        self.check_complete()
        out = {}
        for name in list(self._parts):
            out[name] = b"".join(self._parts.pop(name))
        return out
