"""0.1.0's training module; the training SAEs now live in one module per architecture.

Importing a name from here still works, with a ``DeprecationWarning`` naming
its new home (:mod:`sae_lens_choice.mutual_choice_sae`,
:mod:`sae_lens_choice.feature_choice_sae`).
"""

from sae_lens_choice._moved import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "MutualChoiceTrainingSAE": "sae_lens_choice.mutual_choice_sae",
        "MutualChoiceTrainingSAEConfig": "sae_lens_choice.mutual_choice_sae",
        "FeatureChoiceTrainingSAE": "sae_lens_choice.feature_choice_sae",
        "FeatureChoiceTrainingSAEConfig": "sae_lens_choice.feature_choice_sae",
    },
)
