"""0.1.0's training module; the training SAEs now live in one module per architecture.

Importing a name from here still works, with a ``DeprecationWarning`` naming
its new home (:mod:`sae_lens_choice.mutual_choice_sae`,
:mod:`sae_lens_choice.feature_choice_sae`, :mod:`sae_lens_choice.choice_base`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "MutualChoiceTrainingSAE": "sae_lens_choice.mutual_choice_sae",
    "MutualChoiceTrainingSAEConfig": "sae_lens_choice.mutual_choice_sae",
    "FeatureChoiceTrainingSAE": "sae_lens_choice.feature_choice_sae",
    "FeatureChoiceTrainingSAEConfig": "sae_lens_choice.feature_choice_sae",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"sae_lens_choice.training.{name} moved to {_MOVED[name]}.{name}; "
            "import it from there or from sae_lens_choice",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
