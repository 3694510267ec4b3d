"""What a demo run returns: one row per evaluated SAE, and the run's results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_lens_choice.demo.config import DemoConfig
from sae_lens_choice.evaluation import SAEEvaluation

__all__ = ["RECALIBRATED", "SAVED", "DemoResults", "ModelResult"]

#: ``ModelResult.thresholds``: the thresholds the saved folder holds, as
#: ``SAE.load_from_disk`` gives them to users ...
SAVED = "saved"
#: ... or recomputed by ``calibrate_thresholds`` on the calibration split.
RECALIBRATED = "recalibrated"


@dataclass(frozen=True)
class ModelResult(SAEEvaluation):
    """The per-token evaluation of one saved SAE on the held-out split.

    Every metric of :class:`sae_lens_choice.evaluation.SAEEvaluation`
    (``nmse``, ``explained_variance``, ``l0_mean``, ``dead_latents``, ``mcc``,
    ``densities``, ...), plus which model it is.

    Attributes:
        name: the row's name: the architecture's for the SAE as saved,
            ``<architecture>_recalibrated`` after ``calibrate_thresholds``.
        architecture: the row of the architecture table it was trained as.
        sae_architecture: what ``SAE.load_from_disk`` loads it as (``"jumprelu"``, ``"topk"``).
        k: the k it was trained for.
        thresholds: :data:`SAVED`, :data:`RECALIBRATED`, or ``"per-token top-k"`` (TopK).
        threshold: where the thresholds come from, in words.
        path: the saved folder (SAELens format, with ``sparsity.safetensors``).
        train_seconds: training wall time, data generation excluded.
        train_samples: training samples seen.
        train_samples_per_second: ``train_samples / train_seconds``.
    """

    name: str
    architecture: str
    sae_architecture: str
    k: float
    thresholds: str
    threshold: str
    path: str
    train_seconds: float
    train_samples: int
    train_samples_per_second: float

    def to_dict(self, include_tensors: bool = False) -> dict[str, Any]:
        """The row's fields, then the evaluation's (see ``SAEEvaluation.to_dict``)."""
        own = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.metric_fields()
        }
        return {**own, **super().to_dict(include_tensors)}


@dataclass
class DemoResults:
    """What :func:`sae_lens_choice.demo.run_demo` returns; ``to_dict()`` is ``results.json``."""

    config: DemoConfig
    data: dict[str, Any]
    models: list[ModelResult]
    sweep: list[ModelResult]
    output_dir: Path
    files: dict[str, str]
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (tensors left out)."""
        config = dataclasses.asdict(self.config)
        config["output_dir"] = str(self.config.output_dir)
        config["architectures"] = list(self.config.architectures)
        config["sweep_k"] = list(self.config.sweep_k)
        config["dead_feature_window"] = self.config.resolved_dead_feature_window()
        return {
            "config": config,
            "data": self.data,
            "models": [m.to_dict() for m in self.models],
            "sweep": [m.to_dict() for m in self.sweep],
            "output_dir": str(self.output_dir),
            "files": self.files,
            "wall_seconds": self.wall_seconds,
        }

    def to_markdown(self) -> str:
        """``results.md``: the settings, the table and the files written."""
        from sae_lens_choice.demo.report import results_markdown

        return results_markdown(self)
