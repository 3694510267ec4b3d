"""Using a saved Choice SAE: its training settings, and exact batch-mode encoding.

A SAE trained with this package is saved as SAELens's own ``jumprelu``
architecture (per-token encoding, loads anywhere); SAELens writes the training
config's own fields into ``metadata["training_architecture"]`` and
``metadata["training_architecture_details"]``. :func:`choice_settings` reads
them back (and the same settings from a training SAE or a 0.1.0 inference
SAE), and :func:`encode_batch` reproduces the training allocation over a
batch: Mutual Choice's top round(k * N) pairs, Feature Choice's per-latent
capacities.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.saes.sae import SAE

# the module, not the class: `MutualChoice` is a name this module only forwards, with
# a deprecation warning (see `__getattr__` below)
from sae_lens_choice import mutual_choice_sae
from sae_lens_choice._moved import moved_names
from sae_lens_choice.allocation import pairs_to_dense
from sae_lens_choice.choice_base import (
    CHOICE_ARCHITECTURES,
    ChoiceSAE,
    ChoiceTrainingSAE,
    choice_hidden_pre,
)
from sae_lens_choice.feature_choice_sae import FeatureChoice, FeatureChoiceTrainingSAE

__all__ = ["BATCH_ARCHITECTURES", "choice_settings", "encode_batch"]

#: Training architectures whose allocation :func:`encode_batch` can reproduce.
BATCH_ARCHITECTURES = (*CHOICE_ARCHITECTURES, "batchtopk")


def choice_settings(sae: SAE[Any]) -> dict[str, Any] | None:
    """The training architecture and settings of ``sae``, or ``None`` if it has none.

    Returns a dict with ``"architecture"`` (one of :data:`BATCH_ARCHITECTURES`),
    ``"k"`` and, for Feature Choice, ``"capacity"``, ``"zipf_alpha"`` and
    ``"zipf_beta"``, plus whatever else the training config held. Read from
    the config of a training or 0.1.0 inference SAE of this package, or from
    the metadata of a saved JumpReLU (also one exported by 0.1.0, which kept
    its config under ``metadata["sae_lens_choice_config"]``).
    """
    cfg = sae.cfg
    if isinstance(sae, (ChoiceTrainingSAE, ChoiceSAE)):
        settings = {k: v for k, v in cfg.to_dict().items() if k != "metadata"}
        settings["architecture"] = cfg.architecture()
        return settings
    metadata = cfg.metadata
    legacy = metadata.get("sae_lens_choice_config")
    if isinstance(legacy, dict) and legacy.get("architecture") in BATCH_ARCHITECTURES:
        # a JumpReLU exported by 0.1.0 kept our config under its own key
        return dict(legacy)
    arch = metadata.get("training_architecture")
    details = metadata.get("training_architecture_details") or {}
    if arch not in BATCH_ARCHITECTURES or "k" not in details:
        return None
    return {**details, "architecture": arch}


@torch.no_grad()
def encode_batch(sae: SAE[Any], x: torch.Tensor, *, offset: float = 0.5) -> torch.Tensor:
    """Encode ``x`` with the training allocation over all its tokens.

    A token's code then depends on the rest of the batch, as in training; the
    SAE's own ``encode`` is the per-token JumpReLU users want downstream. The
    training options are followed: the allocation score, and Feature Choice's
    capacity ranking (``capacity_order="density_rank"``, saved in the metadata).

    Args:
        sae: a saved Choice SAE as SAELens loads it (``jumprelu`` with this
            package's metadata; also a ``batchtopk``-trained JumpReLU), a
            training SAE, or a 0.1.0 inference SAE.
        x: (..., d_in) activations; the leading dimensions are the batch.
        offset: Feature Choice's capacity-rounding offset in [0, 1)
            (``allocation.rounding_offset``); fixed, so encoding is a
            deterministic function of the batch.

    Returns:
        (..., d_sae) feature activations.

    Raises:
        TypeError: ``sae`` carries no Choice or BatchTopK training settings.
        ValueError: ``hidden_pre`` holds NaN or inf.
    """
    settings = choice_settings(sae)
    if settings is None:
        raise TypeError(
            "encode_batch needs a SAE trained as mutual_choice, feature_choice or batchtopk "
            f"(its metadata names the training architecture and k); got {type(sae).__name__} "
            f"(architecture {sae.cfg.architecture()!r})"
        )
    sae_in = sae.process_sae_in(x)
    hidden_pre = choice_hidden_pre(sae, sae_in)  # (..., F)
    d_sae = hidden_pre.shape[-1]
    scores = hidden_pre.reshape(-1, d_sae)  # (N, F)
    if settings.get("allocation_score") == "hidden_pre_over_input_norm":
        norms = sae_in.reshape(scores.shape[0], -1).norm(dim=-1, keepdim=True)  # (N, 1)
        scores = scores / norms.clamp(min=1e-6)
    if settings["architecture"] == "feature_choice":
        activation = FeatureChoice(
            settings["k"],
            d_sae,
            settings.get("capacity", "zipf"),
            settings.get("zipf_alpha", 1.0),
            settings.get("zipf_beta", 0.0),
        )
        # capacity_order="density_rank": the training SAE's ranking, or the saved one
        if isinstance(sae, FeatureChoiceTrainingSAE):
            ranking = sae.capacity_ranking()
        else:
            ranking = sae.cfg.metadata.get("capacity_ranking")
        if ranking is not None:
            ranking = torch.as_tensor(ranking, dtype=torch.long, device=scores.device)
        pairs = activation.pairs(scores, offset=offset, ranking=ranking)
    else:
        pairs = mutual_choice_sae.MutualChoice(
            settings["k"],
            settings.get("allocation_method", "auto"),
            latent_floor=settings.get("latent_floor", 0.0),
        ).pairs(scores)
    # the scores chose the pairs; the activations are the pre-activations there
    return sae.hook_sae_acts_post(pairs_to_dense(pairs, hidden_pre))


# Names this module held in 0.1.0, now in the per-architecture modules.
__getattr__ = moved_names(
    __name__,
    {
        "MutualChoiceSAE": "sae_lens_choice.mutual_choice_sae",
        "MutualChoiceSAEConfig": "sae_lens_choice.mutual_choice_sae",
        "MutualChoice": "sae_lens_choice.mutual_choice_sae",
        "FeatureChoiceSAE": "sae_lens_choice.feature_choice_sae",
        "FeatureChoiceSAEConfig": "sae_lens_choice.feature_choice_sae",
        "jumprelu": "sae_lens_choice.choice_base",
    },
)
