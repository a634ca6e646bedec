"""Shared fixtures. ``tiny_models`` (next to this file) builds tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import FAMILY_NAMES


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    return request.param
