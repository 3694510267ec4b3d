"""Feature Choice and Mutual Choice sparse autoencoders for SAELens.

Reference implementation of Ayonrinde (2024), "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders" (arXiv 2411.02124).
Importing this package registers ``architecture="mutual_choice"`` and
``architecture="feature_choice"`` with SAELens.
"""

from sae_lens_choice import allocation, losses, zipf
from sae_lens_choice.calibration import calibrate_thresholds
from sae_lens_choice.export import to_jumprelu
from sae_lens_choice.inference import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
)
from sae_lens_choice.registration import register as _register
from sae_lens_choice.training import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)

_register()

__version__ = "0.1.0"

__all__ = [
    "FeatureChoiceSAE",
    "FeatureChoiceSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "MutualChoiceSAE",
    "MutualChoiceSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
    "__version__",
    "allocation",
    "calibrate_thresholds",
    "losses",
    "to_jumprelu",
    "zipf",
]
