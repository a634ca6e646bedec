"""How a call names the model it runs on, when a server serves several.

A call names its model in the gRPC metadata ``splitlearn-model`` (:data:`MODEL_METADATA`),
not in its body: the server routes the call before it decodes anything, a ``Session``
stream names it once for all its messages, and a proxy can route on it too. A call that
names no model runs on the server's first (default) model. The health service answers
for each model by its name (``grpc.health.v1`` ``service`` field).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from splitlearn_async.errors import ConfigError

__all__ = ["DEFAULT_MODEL", "MODEL_METADATA", "check_model_name", "requested_model"]

#: The gRPC metadata key a call names its model with (absent: the server's first model).
MODEL_METADATA = "splitlearn-model"
#: The name of a server's model when it was given one trunk, not named models.
DEFAULT_MODEL = "default"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_model_name(name: object) -> str:
    """``name`` if it is a valid model name: 1-64 letters, digits, ``.``, ``_`` or ``-``, the first a letter or digit.

    Raises:
        ConfigError: it is not.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"a model name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; "
            f"got {name!r}."
        )
    return name


def requested_model(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The model a call names in its metadata (:data:`MODEL_METADATA`), or None."""
    for key, value in metadata or ():
        if key.lower() == MODEL_METADATA:
            return value if isinstance(value, str) else bytes(value).decode("latin-1")
    return None
