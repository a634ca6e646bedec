"""The one place where splitlearn-async bridges transformers releases.

transformers 5.x renamed the KV-cache argument of model and layer ``forward`` from
``past_key_values`` to ``cache`` (and the output field likewise); newer releases warn on the
old name and will drop it. ``pyproject.toml`` admits every 5.x release, so code that hands a
Hugging Face module a cache asks here for the spelling the installed release takes, instead
of naming either one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["cache_argument", "cache_kwargs", "output_cache"]

_NEW, _OLD = "cache", "past_key_values"


@functools.cache
def _argument_for(forward: Callable[..., Any]) -> str:
    """The cache argument's name in the signature of a module class's ``forward``."""
    params = inspect.signature(forward).parameters
    return _NEW if _NEW in params else _OLD


def cache_argument(module: Any) -> str:
    """The name under which ``module.forward`` takes its KV cache: ``"cache"`` or ``"past_key_values"``."""
    return _argument_for(type(module).forward)


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``module(**inputs, **cache_kwargs(module, cache))``, whatever the release."""
    return {cache_argument(module): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``output.cache``, or ``past_key_values`` on older releases)."""
    declared = getattr(type(output), "__dataclass_fields__", {})
    return getattr(output, _NEW if _NEW in declared else _OLD)
