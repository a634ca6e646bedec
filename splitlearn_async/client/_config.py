"""ClientConfig: deadlines, retries, security and wire options of :class:`RemoteTrunk`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..protocol.checkpoints import CHUNK_OVERHEAD, MIN_CHUNK_BYTES, default_chunk_bytes

__all__ = ["ClientConfig"]

_WIRE_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _number(name: str, value: object, *, allow_none: bool = False, minimum: float = 0.0, fix: str) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > minimum
    ):
        raise ConfigError(f"ClientConfig.{name} must be a number > {minimum:g}, got {value!r}; {fix}.")


@dataclass(frozen=True)
class ClientConfig:
    """Options of :class:`RemoteTrunk`.

    Attributes:
        step_timeout_s: Deadline of one trunk call (a prompt or a decode step, or a
            ``Forward``); past it the call is cancelled, its server session freed, and
            :class:`TrunkTimeout` raised. ``None`` waits forever.
        retry_deadline_s: How long a call keeps retrying while the server is unreachable
            (``UNAVAILABLE``: down, restarting, shutting down), counted from the first
            failure. Past it the caller gets :class:`TrunkUnavailable`. Only
            ``UNAVAILABLE`` is retried; every other status fails at once.
        initial_backoff_s: First wait between retries; each next wait is
            ``backoff_multiplier`` times longer, up to ``max_backoff_s``, with +-20% jitter.
        max_backoff_s: Longest wait between retries.
        backoff_multiplier: Growth of the wait between retries (>= 1).
        replay: Keep the hidden states a session has sent, so that after a broken stream
            (server restart) a new session is opened and the history replayed, giving
            output identical to an undisturbed run. ``False`` saves that memory (about
            ``rows x tokens x hidden_size x 4`` bytes per session) and makes a broken
            stream fail with :class:`TrunkUnavailable`.
        wire_dtype: ``None`` sends hidden states in their own dtype (exact);
            ``"float16"``/``"bfloat16"`` halve the bytes at a small accuracy cost (see the
            README's table).
        auth_token: Bearer token sent as ``authorization: Bearer <token>`` on every call.
        tls: Speak TLS. With ``tls_root_cert_file`` unset the system's roots are used.
        tls_root_cert_file: PEM file of the root certificate(s) to trust (implies ``tls``).
        tls_server_name: Override the name checked against the server's certificate.
        max_message_bytes: Largest message body either way, in bytes.
        chunk_bytes: Size of the chunks checkpoints travel in (``load_adapter``,
            ``open_training`` with weights, a training session's ``state``/``save``), so a
            checkpoint of any size crosses under the message limits. ``None``: 4 MiB, or
            less to fit ``max_message_bytes``. Must fit the server's ``max_message_bytes``
            too (less 128 bytes of framing); a save is sent in chunks no larger.

    Raises:
        ConfigError: a field is out of range; the message names the value and the fix.
    """

    step_timeout_s: float | None = 120.0
    retry_deadline_s: float = 30.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    replay: bool = True
    wire_dtype: str | None = None
    auth_token: str | None = None
    tls: bool = False
    tls_root_cert_file: str | None = None
    tls_server_name: str | None = None
    max_message_bytes: int = 256 * 1024 * 1024
    chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        _number("step_timeout_s", self.step_timeout_s, allow_none=True, fix="use None to wait forever")
        _number("retry_deadline_s", self.retry_deadline_s, fix="use a small value such as 0.1 to fail fast")
        _number("initial_backoff_s", self.initial_backoff_s, fix="e.g. 0.1")
        _number("max_backoff_s", self.max_backoff_s, fix="e.g. 2.0")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError(
                f"ClientConfig.max_backoff_s ({self.max_backoff_s}) must be >= initial_backoff_s "
                f"({self.initial_backoff_s}); raise max_backoff_s."
            )
        if (
            isinstance(self.backoff_multiplier, bool)
            or not isinstance(self.backoff_multiplier, (int, float))
            or not 1.0 <= self.backoff_multiplier <= 10.0
        ):
            raise ConfigError(
                f"ClientConfig.backoff_multiplier must lie in [1, 10], got {self.backoff_multiplier!r}; 2.0 is usual."
            )
        if self.wire_dtype is not None and self.wire_dtype not in _WIRE_DTYPE_NAMES:
            raise ConfigError(
                f"ClientConfig.wire_dtype must be None or one of {', '.join(_WIRE_DTYPE_NAMES)}, got {self.wire_dtype!r}."
            )
        if self.auth_token is not None and (not isinstance(self.auth_token, str) or not self.auth_token.strip()):
            raise ConfigError("ClientConfig.auth_token must be a non-empty string or None.")
        if (
            isinstance(self.max_message_bytes, bool)
            or not isinstance(self.max_message_bytes, int)
            or self.max_message_bytes < 1024
        ):
            raise ConfigError(
                f"ClientConfig.max_message_bytes must be an int >= 1024, got {self.max_message_bytes!r}; "
                "the default is 256 MiB."
            )
        if self.chunk_bytes is not None and (
            isinstance(self.chunk_bytes, bool)
            or not isinstance(self.chunk_bytes, int)
            or not MIN_CHUNK_BYTES <= self.chunk_bytes <= self.max_message_bytes - CHUNK_OVERHEAD
        ):
            raise ConfigError(
                f"ClientConfig.chunk_bytes must be None or an int in {MIN_CHUNK_BYTES}..max_message_bytes - "
                f"{CHUNK_OVERHEAD} = {self.max_message_bytes - CHUNK_OVERHEAD}, got {self.chunk_bytes!r}; "
                "None picks 4 MiB (or less, to fit)."
            )

    @property
    def effective_chunk_bytes(self) -> int:
        """The chunk size checkpoints are sent and asked for in."""
        return self.chunk_bytes if self.chunk_bytes is not None else default_chunk_bytes(self.max_message_bytes)

    @property
    def uses_tls(self) -> bool:
        """True when the channel speaks TLS (``tls`` or a root certificate file is set)."""
        return self.tls or self.tls_root_cert_file is not None

    def backoff_s(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0-based), before jitter."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * self.backoff_multiplier**attempt))
