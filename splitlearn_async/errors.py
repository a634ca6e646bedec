"""The one exception tree of splitlearn-async.

Every error the library raises on purpose is a :class:`SplitLearnError`. Errors that are
also a caller's mistake derive from :class:`ValueError` as well, so generic handlers work::

    SplitLearnError
    ├── ConfigError (ValueError)            a configuration value or an argument is out of range
    │   └── ArgumentError (TypeError)       an argument has the wrong type
    ├── StateError (RuntimeError)           an object was used in a state that does not allow it
    ├── ModelError
    │   ├── UnsupportedModelError (ValueError)  the model family is not supported
    │   ├── SplitPointError (ValueError)        split points out of range or unordered
    │   ├── CheckpointError                     a checkpoint tensor is missing or misshapen
    │   └── BundleError                         a stage bundle cannot be used
    │       ├── BundleCorruptError              a file is missing, unreadable or fails its checksum
    │       └── MissingPartError (KeyError)     the bundle lacks the asked-for part
    ├── WireError (ValueError)              a frame on the wire is malformed
    ├── WorkerStopped (RuntimeError)        the torch worker was stopped; it takes no new work
    ├── WorkerDied (RuntimeError)           the torch worker thread crashed; every call fails fast
    └── TrunkError                          the trunk (remote or local) failed a call
        ├── TrunkUnavailable                the server cannot be reached (after retries)
        ├── TrunkTimeout                    a call ran past its deadline
        ├── TrunkBusy                       the server is full (RESOURCE_EXHAUSTED)
        ├── TrunkRejected (ValueError)      the server refused the input (INVALID_ARGUMENT)
        │   ├── PreconditionFailed          the call cannot run in the trunk's current state
        │   └── AlreadyExists               the name (of an adapter) is taken
        ├── SessionNotFound (KeyError)      unknown, expired or closed session
        │   ├── StepNotFound                unknown, used or expired training step
        │   ├── AdapterNotFound             no adapter of that name is loaded
        │   └── ModelNotFound               the server serves no model of that name
        ├── Unauthenticated                 missing or wrong bearer token
        └── ClientClosed                    the client was used after ``aclose()``

Errors and gRPC status codes correspond through one table,
:data:`splitlearn_async.protocol.status.STATUS_TABLE`: the server answers an error of this
tree with its row's code, and the client turns a code back into its row's class.
"""

from __future__ import annotations

__all__ = [
    "AdapterNotFound",
    "AlreadyExists",
    "ArgumentError",
    "BundleCorruptError",
    "BundleError",
    "CheckpointError",
    "ClientClosed",
    "ConfigError",
    "MissingPartError",
    "ModelError",
    "ModelNotFound",
    "PreconditionFailed",
    "SessionNotFound",
    "SplitLearnError",
    "SplitPointError",
    "StateError",
    "StepNotFound",
    "TrunkBusy",
    "TrunkError",
    "TrunkRejected",
    "TrunkTimeout",
    "TrunkUnavailable",
    "Unauthenticated",
    "UnsupportedModelError",
    "WireError",
    "WorkerDied",
    "WorkerStopped",
]


class SplitLearnError(Exception):
    """Base class of every error raised by splitlearn-async."""


class ConfigError(SplitLearnError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class ArgumentError(ConfigError, TypeError):
    """An argument has the wrong type; the message names it and the type expected."""


class StateError(SplitLearnError, RuntimeError):
    """An object was used in a state that does not allow it: not started yet, started twice, another loop."""


class ModelError(SplitLearnError):
    """A model cannot be split, loaded or saved."""


class UnsupportedModelError(ModelError, ValueError):
    """The model's family (``config.model_type``) has no record in the registry."""


class SplitPointError(ModelError, ValueError):
    """Split points are out of range or not ordered."""


class CheckpointError(ModelError):
    """A checkpoint lacks a tensor a stage needs, or a tensor has the wrong shape."""


class BundleError(ModelError):
    """A stage bundle on disk cannot be used."""


class BundleCorruptError(BundleError):
    """A bundle file is missing, unreadable, or does not match its recorded checksum."""


class MissingPartError(BundleError, KeyError):
    """The bundle does not contain the asked-for part (bottom, trunk or top)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain sentence
        return str(self.args[0]) if self.args else ""


class WireError(SplitLearnError, ValueError):
    """A message on the wire is malformed: bad msgpack, dtype, shape, byte count or values."""


class WorkerStopped(SplitLearnError, RuntimeError):
    """The worker was stopped: it takes no new work, and queued work past the grace period is dropped."""


class WorkerDied(SplitLearnError, RuntimeError):
    """The worker thread crashed; every pending and later call fails with this error."""


class TrunkError(SplitLearnError):
    """A call to the trunk failed.

    Attributes:
        code: For a failed gRPC call, its ``grpc.StatusCode``; None otherwise.
    """

    code: object = None


class TrunkUnavailable(TrunkError):
    """The trunk server could not be reached within the deadline, retries included."""


class TrunkTimeout(TrunkError, TimeoutError):
    """A trunk call ran past its deadline."""


class TrunkBusy(TrunkError):
    """The trunk server is full (token budget or session limit) and refused the session."""


class TrunkRejected(TrunkError, ValueError):
    """The trunk server refused the input as invalid; retrying the same input cannot help."""


class PreconditionFailed(TrunkRejected):
    """The call cannot run in the trunk's current state (FAILED_PRECONDITION); the message says what must happen first."""


class AlreadyExists(TrunkRejected):
    """The name is taken, e.g. by a loaded adapter (ALREADY_EXISTS)."""


class SessionNotFound(TrunkError, KeyError):
    """The session is unknown to the trunk: never opened, expired or closed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StepNotFound(SessionNotFound):
    """The training step is unknown: never returned by a forward, already used, or expired."""


class AdapterNotFound(SessionNotFound):
    """No adapter of that name is loaded on the trunk."""


class ModelNotFound(SessionNotFound):
    """The server serves no model of the name the call gave (NOT_FOUND; the sentence lists its models)."""


class Unauthenticated(TrunkError):
    """The server requires a bearer token and the call had none or a wrong one."""


class ClientClosed(TrunkError, RuntimeError):
    """The client was used after it was closed."""
