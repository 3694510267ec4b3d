"""The demo's settings (:class:`DemoConfig`) and their validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_lens_choice.demo.architectures import ARCHITECTURE_TABLE, ARCHITECTURES
from sae_lens_choice.validation import check_choice, check_number

__all__ = ["DemoConfig", "DemoError", "flag", "prepare_output_dir"]


class DemoError(Exception):
    """A usage error: bad settings, or an output path that cannot be written."""


def flag(name: str) -> str:
    """The command-line flag of a :class:`DemoConfig` field (``d_in`` -> ``--d-in``)."""
    return "--" + name.replace("_", "-")


@dataclass
class DemoConfig:
    """Settings of one demo run; the defaults take about 2 minutes on 2 CPU cores.

    Args:
        d_in: Width of the activations (``SyntheticModelConfig.hidden_dim``).
        n_features: Number of true features (more than ``d_in``: superposition).
        d_sae: Latents per SAE.
        k: Expected L0 per token, shared by all models (TopK uses ``round(k)``).
        training_samples: Training activations per model.
        batch_size: Activations per training batch.
        lr: Adam learning rate; constant, then a linear decay over the last
            ``lr_decay_fraction`` of training (SAELens's ``lr_decay_steps``).
        lr_decay_fraction: Share of steps spent decaying the learning rate to lr / 10.
        dead_feature_window: Steps without firing after which SAELens's trainer
            calls a latent dead (feeds the aux losses); ``None``: an eighth of the
            training steps, at least 10 and at most SAELens's default 1000.
        calibration_samples: Held-out activations for threshold recalibration.
        eval_samples: Held-out activations for the evaluation.
        seed: Seeds the synthetic model, every SAE's initialisation and the data.
        firing_zipf_exponent: Exponent of the true features' Zipfian firing probabilities.
        firing_max_prob: Firing probability of the most frequent true feature.
        firing_min_prob: Firing probability of the least frequent true feature.
        firing_magnitude_std: Std of the true features' firing magnitudes (mean 1).
        threads: CPU threads for torch during the run (restored afterwards);
            ``None`` leaves torch's setting. The default 1: the demo's matrices
            are small, so a second thread gains little, and when other processes
            share the cores, OpenMP's spinning threads made training 10-20x slower
            in our measurements. Raise it for large ``--scale`` runs.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        architectures: Which rows of the architecture table to train
            (:data:`sae_lens_choice.demo.ARCHITECTURES`).
        sweep_k: Extra k values: every architecture is trained again at each, for
            the NMSE-vs-L0 frontier plot.
        output_dir: Where SAEs, ``results.{md,json}`` and plots go.
        show_progress: Progress bars and the printed table.
    """

    d_in: int = 48
    n_features: int = 384
    d_sae: int = 384
    k: float = 4.0
    training_samples: int = 2**20
    batch_size: int = 2**10
    lr: float = 3e-3
    lr_decay_fraction: float = 0.2
    dead_feature_window: int | None = None
    calibration_samples: int = 2**15
    eval_samples: int = 2**15
    seed: int = 0
    firing_zipf_exponent: float = 1.0
    firing_max_prob: float = 0.3
    firing_min_prob: float = 0.003
    firing_magnitude_std: float = 0.25
    threads: int | None = 1
    device: str = "cpu"
    architectures: tuple[str, ...] = ARCHITECTURES
    sweep_k: tuple[float, ...] = ()
    output_dir: str | Path = "demo_output"
    show_progress: bool = True

    def scaled(self, scale: float) -> DemoConfig:
        """A copy with sample counts and widths (d_in, n_features, d_sae) times ``scale``."""
        _check(lambda: check_number(scale, "--scale", gt=0))

        def s(value: int) -> int:
            return max(1, round(value * scale))

        return dataclasses.replace(
            self,
            d_in=s(self.d_in),
            n_features=s(self.n_features),
            d_sae=s(self.d_sae),
            training_samples=s(self.training_samples),
            calibration_samples=s(self.calibration_samples),
            eval_samples=s(self.eval_samples),
        )

    @property
    def n_steps(self) -> int:
        """Training steps per model (whole batches only)."""
        return self.training_samples // self.batch_size

    def resolved_dead_feature_window(self) -> int:
        """``dead_feature_window``, or its default for this number of steps."""
        if self.dead_feature_window is not None:
            return self.dead_feature_window
        return min(1000, max(10, self.n_steps // 8))

    def all_k(self) -> list[float]:
        """The main k first, then the sweep's other values in increasing order."""
        return [self.k, *sorted({float(k) for k in self.sweep_k} - {float(self.k)})]

    def validate(self) -> None:
        """Raise :class:`DemoError` naming the first bad setting."""
        _check(self._validate)

    def _validate(self) -> None:
        for name in (
            "d_in",
            "n_features",
            "d_sae",
            "training_samples",
            "batch_size",
            "calibration_samples",
            "eval_samples",
        ):
            check_number(getattr(self, name), flag(name), integer=True, gt=0)
        if self.training_samples < self.batch_size:
            raise DemoError(
                f"--training-samples ({self.training_samples}) must be at least "
                f"--batch-size ({self.batch_size}): no training step would run"
            )
        if self.dead_feature_window is not None:
            check_number(self.dead_feature_window, "--dead-feature-window", integer=True, gt=0)
        if self.threads is not None:
            check_number(self.threads, "--threads", integer=True, gt=0)
        for name, values in (("--k", [self.k]), ("--sweep-k", list(self.sweep_k))):
            for k in values:
                check_number(k, name, gt=0)
                if k > self.d_sae:
                    raise DemoError(f"{name} {k:g} is larger than --d-sae {self.d_sae}")
                if "topk" in self.architectures and round(k) < 1:
                    raise DemoError(f"{name} {k} rounds to 0, which topk cannot use")
        check_number(self.lr, "--lr", gt=0)
        check_number(self.lr_decay_fraction, "lr_decay_fraction", ge=0, lt=1)
        check_number(self.firing_max_prob, "firing_max_prob", gt=0, le=1)
        check_number(self.firing_min_prob, "firing_min_prob", gt=0, lt=self.firing_max_prob)
        check_number(self.firing_zipf_exponent, "firing_zipf_exponent", gt=0)
        check_number(self.firing_magnitude_std, "firing_magnitude_std", ge=0)
        check_number(self.seed, "--seed", integer=True, ge=0)
        if not self.architectures:
            raise DemoError("no architectures selected")
        for name in self.architectures:
            check_choice(name, "--architectures", ARCHITECTURE_TABLE)
        _check_device(self.device)


def _check(validate: Callable[[], object]) -> None:
    """Run ``validate()``; its ``ValueError`` becomes a :class:`DemoError`."""
    try:
        validate()
    except ValueError as e:
        raise DemoError(str(e)) from None


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DemoError(f"--device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DemoError(
                f"--device {device} was requested but CUDA is not available on this "
                "machine (torch.cuda.is_available() is False); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DemoError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif dev.type not in ("cpu", "mps"):
        raise DemoError(f"--device {device!r}: the demo runs on cpu or cuda")


def prepare_output_dir(path: Path) -> Path:
    """Create ``path`` and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sae_lens_choice_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DemoError(f"output directory {str(path)!r} is not writable: {e}") from None
    return path
