"""Feature Choice and Mutual Choice sparse autoencoders for SAELens.

Reference implementation of Ayonrinde (2024), "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders" (arXiv 2411.02124).
Importing this package registers ``architecture="mutual_choice"`` and
``architecture="feature_choice"`` with SAELens (training, and loading folders
saved by 0.1.0). Trained SAEs are saved as SAELens's own ``jumprelu``
architecture, so they load without this package.
"""

from typing import Any

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_choice import allocation, losses, zipf
from sae_lens_choice.calibration import calibrate_thresholds, compute_thresholds
from sae_lens_choice.evaluation import SAEEvaluation, evaluate_sae
from sae_lens_choice.export import to_jumprelu
from sae_lens_choice.feature_choice_sae import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)
from sae_lens_choice.inference import choice_settings, encode_batch
from sae_lens_choice.mutual_choice_sae import (
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)

__version__ = "0.2.0"

#: What ``import sae_lens_choice`` registers: (registry, architecture, classes).
#: The inference classes load folders saved by 0.1.0; new saves are ``jumprelu``.
REGISTRATIONS: tuple[tuple[str, str, tuple[type[Any], type[Any]]], ...] = (
    ("training", "mutual_choice", (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig)),
    ("training", "feature_choice", (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig)),
    ("inference", "mutual_choice", (MutualChoiceSAE, MutualChoiceSAEConfig)),
    ("inference", "feature_choice", (FeatureChoiceSAE, FeatureChoiceSAEConfig)),
)


def _qualname(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register() -> None:
    """Register our architectures with SAELens, all or nothing.

    Every name is checked before any is registered: if another package already
    registered a different class under one of them, nothing of ours is
    registered and ``ValueError`` names the clash. Names already holding our
    own classes (a second import, ``importlib.reload``) are left as they are.
    """
    registries = {"training": SAE_TRAINING_CLASS_REGISTRY, "inference": SAE_CLASS_REGISTRY}
    to_register = []
    for kind, arch, classes in REGISTRATIONS:
        existing = registries[kind].get(arch)
        if existing is None:
            to_register.append((kind, arch, classes))
        elif [_qualname(c) for c in existing] != [_qualname(c) for c in classes]:
            raise ValueError(
                f"sae_lens_choice cannot register {kind} architecture {arch!r}: "
                f"{_qualname(existing[0])} is already registered under that name, so "
                "nothing of sae_lens_choice was registered. Two plugins claim the same "
                "architecture; uninstall one of them."
            )
    for kind, arch, (sae_class, config_class) in to_register:
        if kind == "training":
            register_sae_training_class(arch, sae_class, config_class)
        else:
            register_sae_class(arch, sae_class, config_class)


register()

__all__ = [
    "REGISTRATIONS",
    "FeatureChoiceSAE",
    "FeatureChoiceSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "MutualChoiceSAE",
    "MutualChoiceSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
    "SAEEvaluation",
    "__version__",
    "allocation",
    "calibrate_thresholds",
    "choice_settings",
    "compute_thresholds",
    "encode_batch",
    "evaluate_sae",
    "losses",
    "register",
    "to_jumprelu",
    "zipf",
]
