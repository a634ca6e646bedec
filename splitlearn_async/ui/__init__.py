"""``splitlearn ui``: a web page to watch split inference and training at work (Gradio).

- :class:`UIBackend` (``_backend.py``): chat answers and a short LoRA run against a trunk
  server, without Gradio;
- :class:`AnswerStats` and :class:`GenerationSettings` (``_stats.py``): what the panel
  shows for an answer, and the settings as ``generate`` takes them;
- :func:`build_app` (``_app.py``): the Gradio page;
- :func:`add_ui_arguments`, :func:`ui_main` (``_cli.py``): the command.

Importing this package imports neither torch nor Gradio; the names above load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._cli import add_ui_arguments, ui_main

__all__ = [
    "SHIPPED_TEXT",
    "WIRE_DTYPES",
    "AnswerStats",
    "GenerationSettings",
    "TrainProgress",
    "UIBackend",
    "add_ui_arguments",
    "build_app",
    "generation_kwargs",
    "ui_main",
]

_LAZY = {
    "SHIPPED_TEXT": "._backend",
    "TrainProgress": "._backend",
    "UIBackend": "._backend",
    "WIRE_DTYPES": "._stats",
    "AnswerStats": "._stats",
    "GenerationSettings": "._stats",
    "generation_kwargs": "._stats",
    "build_app": "._app",
}

if TYPE_CHECKING:  # pragma: no cover
    from ._app import build_app
    from ._backend import SHIPPED_TEXT, TrainProgress, UIBackend
    from ._stats import WIRE_DTYPES, AnswerStats, GenerationSettings, generation_kwargs


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
