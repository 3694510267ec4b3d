"""Shared pytest setup.

Weights & Biases stays off in every test: SAELens's runners call ``wandb.init``
when ``log_to_wandb`` is set, and there is no network.
"""

import os

import pytest

os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(autouse=True)
def _wandb_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
