"""The package imports nothing heavy, and its public names are complete and resolve."""

from __future__ import annotations

import subprocess
import sys

import splitlearn_async


def test_import_pulls_in_no_torch_transformers_or_grpc():
    code = (
        "import sys, splitlearn_async; "
        "print(sorted(m for m in ('torch', 'transformers', 'grpc', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves():
    for name in splitlearn_async.__all__:
        assert getattr(splitlearn_async, name) is not None, name


def test_all_is_complete_and_sorted():
    public = {n for n in dir(splitlearn_async) if not n.startswith("_")} | {"__version__"}
    assert set(splitlearn_async.__all__) == public
    assert splitlearn_async.__all__ == sorted(splitlearn_async.__all__)


def test_unknown_attribute_is_an_attribute_error():
    try:
        splitlearn_async.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
