"""The fixtures every test may use. Helpers live in ``tests/support`` (tiny models, raw gRPC
calls, training references, waiting), imported as ``tests.support.<module>``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from splitlearn_async import split_model
from tests.support.tiny_models import FAMILY_NAMES, tiny_model


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    """Each supported family in turn (llama, gpt2, qwen2, gemma, gemma3)."""
    return str(request.param)


@pytest.fixture(scope="module")
def trunk():
    """The trunk (layers 2..4) of a tiny llama, shared by a test module."""
    return split_model(tiny_model("llama"), (2, 4), parts=("trunk",)).trunk
