"""Message envelopes: msgpack maps with a ``"kind"`` field, and typed field access.

Every message body is one msgpack map. :func:`pack` and :func:`unpack` are the only
places that call msgpack; :func:`field` reads one typed field out of a decoded map and
turns a missing or mistyped field into a :class:`WireError` that says which and why;
:func:`check_keys` refuses fields a message does not declare.

:func:`unpack` decodes within :class:`DecodeLimits`: the lengths of strings, bytes,
arrays and maps, and the number of arrays and maps in one message. Our messages hold a
few dozen containers at most, so a body built to make the decoder allocate millions of
objects fails after a few hundred, in microseconds, before it costs memory.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgpack

from splitlearn_async.errors import ArgumentError, WireError

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "Kind", "check_keys", "field", "message_kind", "pack", "unpack"]

T = TypeVar("T")

_TYPE_NAMES: dict[type, str] = {
    dict: "a map",
    list: "a list",
    tuple: "a list",
    str: "a string",
    bytes: "bytes",
    bool: "a bool",
    int: "an int",
    float: "a number",
    type(None): "nil",
}
_GOT_NAMES: dict[type, str] = {
    dict: "map",
    list: "list",
    tuple: "list",
    str: "str",
    bytes: "bytes",
    bool: "bool",
    int: "int",
    float: "float",
    type(None): "nil",
}


class Kind(str, enum.Enum):
    """The ``"kind"`` of a message: what it asks for or what it answers."""

    OPEN = "open"
    STEP = "step"
    CLOSE = "close"
    FORWARD = "forward"
    BACKWARD = "backward"
    RESULT = "result"
    ERROR = "error"
    SAVE = "save"
    LOAD = "load"
    DELETE = "delete"
    CHUNK = "chunk"

    def __str__(self) -> str:
        return self.value


def pack(message: Mapping[str, Any]) -> bytes:
    """Encode a message as msgpack (``bin`` for bytes, ``str`` for text).

    Args:
        message: A map with string keys; values may be nil, bools, ints, floats, strings,
            bytes (or other buffers), lists, maps, and tensor frames from ``encode_tensor``.

    Returns:
        The msgpack bytes.

    Raises:
        TypeError: ``message`` is not a map, or holds a value msgpack cannot encode (a
            programming error on the sending side, not a malformed frame).
    """
    if not isinstance(message, Mapping):
        raise ArgumentError(f"pack() takes a message map, got {type(message).__name__}.")
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DecodeLimits:
    """What one decoded message may hold (the server derives its own from ``ServerConfig``).

    Attributes:
        max_str: Longest string, in bytes (ids, names, dtypes are far shorter).
        max_bin: Longest ``bin`` value (a tensor's or a checkpoint's bytes); None: the body's size.
        max_array: Longest array (a shape, a list of target modules).
        max_map: Most keys in one map.
        max_containers: Most arrays and maps in the whole message.
    """

    max_str: int = 4096
    max_bin: int | None = None
    max_array: int = 256
    max_map: int = 64
    max_containers: int = 512


#: The limits :func:`unpack` applies when none are given.
DEFAULT_LIMITS = DecodeLimits()


class _ContainerBudget:
    """Counts the arrays and maps msgpack builds; raises once a message holds too many."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.limit = limit

    def spend(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise WireError(
                f"the message holds more than {self.limit} arrays and maps; a message of this protocol "
                "holds a few dozen. Send one of the messages docs/protocol.md describes."
            )
        return container


def unpack(
    data: bytes | bytearray | memoryview, *, max_bytes: int | None = None, limits: DecodeLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Decode one msgpack message that must be a map, within ``limits``.

    Strings are decoded as UTF-8, ``bin`` stays ``bytes``, arrays become lists, map keys
    must be strings or bytes, and extension types are refused. No string, ``bin``, array
    or map may be longer than ``limits`` allows, the message may hold at most
    ``limits.max_containers`` arrays and maps, and nesting deeper than msgpack's own
    stack (1024) is refused: a small body cannot make the decoder build a large object.

    Args:
        data: The message body.
        max_bytes: Refuse bodies larger than this many bytes; ``None`` for no limit.
        limits: The lengths and counts allowed.

    Returns:
        The decoded map.

    Raises:
        WireError: ``data`` is larger than ``max_bytes``, is not valid msgpack (truncated,
            trailing bytes, bad UTF-8, too deeply nested, ...), or its top level is not a map.
        TypeError: ``data`` is not a bytes-like object.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ArgumentError(f"unpack() takes bytes, got {type(data).__name__}.")
    size = memoryview(data).nbytes
    if max_bytes is not None and size > max_bytes:
        raise WireError(
            f"the message has {size} bytes, more than the {max_bytes} accepted; send smaller "
            "messages (fewer tokens per step) or raise the limit."
        )
    budget = _ContainerBudget(limits.max_containers)
    try:
        message = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            list_hook=budget.spend,
            object_hook=budget.spend,
            max_str_len=limits.max_str,
            max_bin_len=size if limits.max_bin is None else min(size, limits.max_bin),
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=64,  # refused by _refuse_ext with a sentence; the cap keeps it cheap
        )
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        # ExtraData, FormatError, StackError and UnicodeDecodeError are all ValueErrors
        raise WireError(f"the message could not be decoded as msgpack: {type(exc).__name__}: {exc}.") from exc
    if not isinstance(message, dict):
        raise WireError(f"the message must be a msgpack map at the top level, got {_got(message)}.")
    return message


def _refuse_ext(code: int, data: bytes) -> object:
    """msgpack ``ext_hook``: our messages never use extension types."""
    raise WireError(
        f"the message holds a msgpack extension type ({code}); only nil, bool, int, float, "
        "str, bin, array and map are used."
    )


@overload
def field(
    msg: Mapping[str, Any],
    key: str,
    type_: type[T],
    *,
    name: str | None = None,
    required: bool = True,
    default: None = None,
) -> T: ...
@overload
def field(
    msg: Mapping[str, Any],
    key: str,
    type_: type[T],
    *,
    name: str | None = None,
    required: bool = True,
    default: T,
) -> T: ...
@overload
def field(
    msg: Mapping[str, Any],
    key: str,
    type_: tuple[type, ...],
    *,
    name: str | None = None,
    required: bool = True,
    default: Any = None,
) -> Any: ...
def field(
    msg: Mapping[str, Any],
    key: str,
    type_: type | tuple[type, ...],
    *,
    name: str | None = None,
    required: bool = True,
    default: Any = None,
) -> Any:
    """Read one typed field from a decoded message.

    Type rules follow msgpack rather than Python: ``bool`` is not an ``int``; an ``int`` is
    accepted where a ``float`` is asked for (and returned as a float); ``bytes`` also
    accepts ``bytearray``; ``list`` and ``dict`` check only the container. A nil value
    counts as absent.

    Args:
        msg: The decoded message map.
        key: The field's key.
        type_: The expected type, or a tuple of accepted types.
        name: How errors call the field; default ``"message field '<key>'"``.
        required: Raise when the field is absent; otherwise return ``default``.
        default: The value of an absent optional field.

    Returns:
        The field's value, or ``default``.

    Raises:
        WireError: a required field is absent, or the value has the wrong type, e.g.
            "message field 'max_tokens' must be an int, got str."
    """
    label = name if name is not None else f"message field {key!r}"
    value = msg.get(key)
    if value is None:
        if required:
            raise WireError(f"{label} is missing; it must be {_expected(type_)}.")
        return default
    types = type_ if isinstance(type_, tuple) else (type_,)
    for t in types:
        if _is_instance(value, t):
            return float(value) if t is float else value
    raise WireError(f"{label} must be {_expected(type_)}, got {_got(value)}.")


def message_kind(msg: Mapping[str, Any], *, expected: Kind | tuple[Kind, ...] | None = None) -> Kind:
    """Read and check the ``"kind"`` field of a message.

    Args:
        msg: The decoded message map.
        expected: The kinds accepted here; ``None`` accepts any known kind.

    Returns:
        The message's kind.

    Raises:
        WireError: ``kind`` is missing, not a string, unknown, or not one of ``expected``.
    """
    raw = field(msg, "kind", str)
    try:
        kind = Kind(raw)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise WireError(
            f"message field 'kind' is {raw[:40]!r}, which is not a message kind; use one of {known}."
        ) from None
    wanted = (expected,) if isinstance(expected, Kind) else expected
    if wanted is not None and kind not in wanted:
        raise WireError(
            f"a {kind.value!r} message arrived where {' or '.join(repr(k.value) for k in wanted)} "
            "was expected; check the order of messages on the stream."
        )
    return kind


def _is_instance(value: object, t: type) -> bool:
    """isinstance with msgpack's view of types (bool is not int, int is a float)."""
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is bytes:
        return isinstance(value, (bytes, bytearray))
    return isinstance(value, t)


def _expected(type_: type | tuple[type, ...]) -> str:
    """'an int', 'a string or nil', ... for error messages."""
    types = type_ if isinstance(type_, tuple) else (type_,)
    return " or ".join(_TYPE_NAMES.get(t, f"a {t.__name__}") for t in types)


def _got(value: object) -> str:
    """The msgpack-flavoured type name of a decoded value, for error messages."""
    return _GOT_NAMES.get(type(value), type(value).__name__)


def check_keys(msg: Mapping[str, Any], allowed: frozenset[str] | set[str], what: str) -> None:
    """Refuse fields that ``what`` does not declare (a typo, or a client of another protocol).

    Raises:
        WireError: ``msg`` has a key outside ``allowed``; the sentence lists the allowed ones.
    """
    extra = [key for key in msg if key not in allowed]
    if extra:
        shown = ", ".join(repr(str(k)[:40]) for k in extra[:4])
        raise WireError(
            f"{what} has unknown field(s) {shown}; it takes {', '.join(sorted(allowed))} (docs/protocol.md)."
        )
