"""SessionStore: the server's open sessions, their token budget and their idle expiry.

The store does no torch work and knows nothing of gRPC: it counts tokens (cache columns
x batch rows), refuses what does not fit with an exception whose message is a whole
sentence, and reports sessions that were idle too long. The servicer maps its
exceptions to status codes and holds each session's KV cache in :attr:`Session.cache`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitlearn_async.errors import TrunkBusy

__all__ = ["Session", "SessionStore", "SessionTooLong", "StoreFull"]

logger = logging.getLogger(__name__)


class StoreFull(TrunkBusy):
    """The server is full: too many sessions, or the token budget over all sessions is spent."""


class SessionTooLong(TrunkBusy, ValueError):
    """One session (or one stateless call) asks for more tokens than a session may hold."""


@dataclass(eq=False)
class Session:
    """One open session.

    Attributes:
        session_id: Its id (the client's, or one made by the store).
        rows: Batch rows ``B``, fixed at open.
        columns: Cache columns reserved (written or being written).
        last_used_s: Clock time of the last message.
        busy: True while a step runs on the worker (the sweeper leaves it alone).
        expired: Set when the sweeper expired it; the stream answers its next message with NOT_FOUND.
        cache: The trunk's KV cache (owned by the servicer).
        cache_bytes: Bytes the cache held after its last step.
        adapter_id: The LoRA adapter the session runs with (None = base weights); part of
            the batch key, since one trunk call uses one adapter.
        model: The name of the model the session runs on (a server may serve several).
    """

    session_id: str
    rows: int
    columns: int = 0
    last_used_s: float = 0.0
    busy: bool = False
    expired: bool = False
    cache: Any = None
    cache_bytes: int = 0
    adapter_id: str | None = None
    model: str = ""
    _closed: bool = field(default=False, repr=False)
    _key: int = field(default=0, repr=False)

    @property
    def tokens(self) -> int:
        """Tokens held: columns x rows."""
        return self.columns * self.rows


class SessionStore:
    """Open sessions under a session limit, a token budget and an idle timeout.

    Args:
        max_sessions: Most sessions open at once.
        max_tokens_total: Budget of tokens (columns x rows) over all sessions.
        max_session_tokens: Most tokens one session may hold.
        session_ttl_s: Idle seconds after which :meth:`expire_idle` removes a session.
        clock: Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        max_sessions: int,
        max_tokens_total: int,
        max_session_tokens: int,
        session_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_tokens_total = max_tokens_total
        self.max_session_tokens = max_session_tokens
        self.session_ttl_s = session_ttl_s
        self._clock = clock
        self._sessions: dict[int, Session] = {}
        self._tokens = 0
        self._ids = itertools.count(1)
        self._opened = 0

    @property
    def sessions_open(self) -> int:
        """Sessions currently open."""
        return len(self._sessions)

    @property
    def tokens_used(self) -> int:
        """Tokens reserved over all open sessions."""
        return self._tokens

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the caches of the open sessions (as of their last step)."""
        return sum(s.cache_bytes for s in self._sessions.values())

    def sessions(self) -> list[Session]:
        """A snapshot of the open sessions."""
        return list(self._sessions.values())

    def sessions_of(self, model: str) -> int:
        """Sessions open on the model named ``model``."""
        return sum(1 for s in self._sessions.values() if s.model == model)

    def active(self, window_s: float) -> int:
        """Sessions busy now or used within the last ``window_s`` seconds."""
        now = self._clock()
        return sum(1 for s in self._sessions.values() if s.busy or now - s.last_used_s < window_s)

    def check_tokens(self, rows: int, columns: int, what: str = "a session") -> None:
        """Raise :class:`SessionTooLong` if ``rows x columns`` exceeds ``max_session_tokens``."""
        if rows * columns > self.max_session_tokens:
            raise SessionTooLong(
                f"{what} of {rows} rows x {columns} tokens = {rows * columns} tokens is more than the "
                f"{self.max_session_tokens} tokens one session may hold (max_session_tokens); "
                "send shorter prompts or fewer rows."
            )

    @property
    def sessions_opened(self) -> int:
        """Sessions opened since the store was made (a replica's share of the sessions)."""
        return self._opened

    def open(self, rows: int, columns: int, session_id: str | None = None) -> Session:
        """Open a session of ``rows`` rows, reserving ``columns`` columns for its first message.

        Returns:
            The new :class:`Session`.

        Raises:
            StoreFull: ``max_sessions`` are open, or the tokens do not fit the budget.
            SessionTooLong: ``rows x columns`` exceeds ``max_session_tokens``.
        """
        self.check_tokens(rows, columns)
        if len(self._sessions) >= self.max_sessions:
            raise StoreFull(
                f"the server is full: {len(self._sessions)} sessions are open and max_sessions is "
                f"{self.max_sessions}; close a session or try again later."
            )
        self._check_budget(rows * columns)
        number = next(self._ids)
        self._opened += 1
        session = Session(session_id or f"s{number}", rows, columns, self._clock(), _key=number)
        self._sessions[number] = session
        self._tokens += session.tokens
        return session

    def extend(self, session: Session, columns: int) -> None:
        """Reserve ``columns`` more columns for ``session``'s next step.

        Raises:
            SessionTooLong: the session would exceed ``max_session_tokens``.
            StoreFull: the token budget over all sessions would be passed.
        """
        self.check_tokens(session.rows, session.columns + columns)
        self._check_budget(session.rows * columns)
        session.columns += columns
        self._tokens += session.rows * columns
        self.touch(session)

    def touch(self, session: Session) -> None:
        """Record that ``session`` was just used."""
        session.last_used_s = self._clock()

    def close(self, session: Session) -> None:
        """Remove ``session`` and return its tokens to the budget; a second call does nothing."""
        if session._closed:
            return
        session._closed = True
        self._sessions.pop(session._key, None)
        self._tokens -= session.tokens
        release = getattr(session.cache, "release", None)
        if release is not None:  # its KV slots go back to the trunk's pool (safe with a step in flight)
            release()
        session.cache = None
        session.cache_bytes = 0

    def expire_idle(self) -> list[Session]:
        """Close and return every session idle for longer than ``session_ttl_s`` (busy ones excepted)."""
        now = self._clock()
        expired = [s for s in self._sessions.values() if not s.busy and now - s.last_used_s > self.session_ttl_s]
        for s in expired:
            s.expired = True
            self.close(s)
            logger.info("session %s expired after %.1f s idle", s.session_id, now - s.last_used_s)
        return expired

    def _check_budget(self, tokens: int) -> None:
        if self._tokens + tokens > self.max_tokens_total:
            raise StoreFull(
                f"the server is full: the token budget of {self.max_tokens_total} tokens over all "
                f"sessions (max_tokens_total) has {self.max_tokens_total - self._tokens} left and "
                f"{tokens} were asked for; try again later."
            )
