"""The one module that touches SAELens's registry.

``register()`` runs on ``import sae_lens_choice``. Registering the same classes
again (a second import, ``importlib.reload``) is a no-op; a *different* class
already registered under one of our architecture names is an error, since
silently replacing it would change what someone else's configs load.
"""

from __future__ import annotations

from typing import Any

from sae_lens import registry

from sae_lens_choice.inference import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
)
from sae_lens_choice.training import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)

ARCHITECTURES = ("mutual_choice", "feature_choice")

_INFERENCE: dict[str, tuple[type[Any], type[Any]]] = {
    "mutual_choice": (MutualChoiceSAE, MutualChoiceSAEConfig),
    "feature_choice": (FeatureChoiceSAE, FeatureChoiceSAEConfig),
}
_TRAINING: dict[str, tuple[type[Any], type[Any]]] = {
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig),
}


def _qualname(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same(existing: tuple[type[Any], type[Any]], ours: tuple[type[Any], type[Any]]) -> bool:
    # After importlib.reload our classes are new objects with the same names.
    return all(_qualname(a) == _qualname(b) for a, b in zip(existing, ours))


def _register_into(
    table: dict[str, tuple[type[Any], type[Any]]],
    ours: dict[str, tuple[type[Any], type[Any]]],
    kind: str,
) -> None:
    for arch, classes in ours.items():
        existing = table.get(arch)
        if existing is not None and not _same(existing, classes):
            raise ValueError(
                f"sae_lens_choice cannot register {kind} architecture {arch!r}: "
                f"{_qualname(existing[0])} is already registered under that name. "
                "Two plugins claim the same architecture; uninstall one of them."
            )
        # Replace our own earlier registration (reload) with the current classes.
        table[arch] = classes


def register() -> None:
    """Register our training and inference classes with SAELens (idempotent)."""
    _register_into(registry.SAE_CLASS_REGISTRY, _INFERENCE, "inference")
    _register_into(registry.SAE_TRAINING_CLASS_REGISTRY, _TRAINING, "training")
