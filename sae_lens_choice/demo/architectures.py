"""The architecture table: a model's name -> how to build its SAELens training config.

The one table of the architectures this project compares, used by the demo
and by ``benchmarks/``. A study that needs option variants (another aux loss,
another normalisation) derives rows with :meth:`Architecture.variant` into a
table of its own, ``{**ARCHITECTURE_TABLE, row.name: row}``, rather than
writing a second table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sae_lens import BatchTopKTrainingSAEConfig, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAEConfig

from sae_lens_choice.feature_choice_sae import FeatureChoiceTrainingSAEConfig
from sae_lens_choice.mutual_choice_sae import MutualChoiceTrainingSAEConfig
from sae_lens_choice.validation import check_choice

__all__ = ["ARCHITECTURES", "ARCHITECTURE_TABLE", "Architecture", "training_config"]


@dataclass(frozen=True)
class Architecture:
    """One row: a named model and the training config that builds it.

    Args:
        name: the key in the table (and the demo's model name).
        label: for tables and plot legends.
        config_class: SAELens training config class (registered with SAELens).
        options: config fields this row sets, over the common ones.
        integer_k: k is a count (TopK): ``round(k)``, at least 1.
        thresholds: saved as a JumpReLU whose thresholds
            :func:`sae_lens_choice.calibrate_thresholds` can recompute
            (BatchTopK, Mutual Choice, Feature Choice; not TopK).
    """

    name: str
    label: str
    config_class: type[TrainingSAEConfig]
    options: Mapping[str, Any] = field(default_factory=dict)
    integer_k: bool = False
    thresholds: bool = True

    def training_config(self, *, d_in: int, d_sae: int, k: float, **common: Any) -> Any:
        """The training config at this size and k; ``common`` are fields every row shares.

        Raises ``ValueError`` (from the config's own validation) on a bad value.
        """
        k_value: float = max(1, round(k)) if self.integer_k else k
        return self.config_class(d_in=d_in, d_sae=d_sae, k=k_value, **{**common, **self.options})  # type: ignore[call-arg]

    def variant(self, name: str, label: str, **options: Any) -> Architecture:
        """A row like this one with more (or other) ``options``."""
        return dataclasses.replace(
            self, name=name, label=label, options={**self.options, **options}
        )


#: The architectures the demo compares, in table order.
ARCHITECTURE_TABLE: dict[str, Architecture] = {
    row.name: row
    for row in (
        Architecture(
            "topk", "TopK (aux_k)", TopKTrainingSAEConfig, integer_k=True, thresholds=False
        ),
        Architecture("batchtopk", "BatchTopK (aux_k)", BatchTopKTrainingSAEConfig),
        Architecture(
            "mutual_choice",
            "Mutual Choice (aux_k)",
            MutualChoiceTrainingSAEConfig,
            # the package default, which the convergence study measured best;
            # the study's `mc` row pins the paper's aux_zipf on top of this one
            {"aux_loss": "aux_k"},
        ),
        Architecture(
            "feature_choice_uniform",
            "Feature Choice (uniform)",
            FeatureChoiceTrainingSAEConfig,
            {"capacity": "uniform"},
        ),
        Architecture(
            "feature_choice_zipf",
            "Feature Choice (Zipf)",
            FeatureChoiceTrainingSAEConfig,
            {"capacity": "zipf"},
        ),
    )
}

#: Names of :data:`ARCHITECTURE_TABLE`'s rows, in order.
ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURE_TABLE)


def training_config(
    name: str,
    *,
    d_in: int,
    d_sae: int,
    k: float,
    table: Mapping[str, Architecture] = ARCHITECTURE_TABLE,
    **common: Any,
) -> Any:
    """The training config of row ``name`` of ``table`` (see :meth:`Architecture.training_config`)."""
    check_choice(name, "architecture", table)
    return table[name].training_config(d_in=d_in, d_sae=d_sae, k=k, **common)
