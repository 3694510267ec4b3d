"""``sae-lens-choice demo`` and ``sae-lens-choice zipf-fit``.

The demo trains five SAEs on SAELens's synthetic data (``sae_lens.synthetic``:
Zipfian firing probabilities, more true features than dimensions, so the
ground truth is known) with SAELens's own ``SAETrainer``, at the same k, the
same initialisation seed and the same data order:

- ``topk`` and ``batchtopk`` (SAELens's, with their default ``aux_k`` loss),
- ``mutual_choice`` (default ``aux_zipf`` loss),
- ``feature_choice`` with uniform and with Zipf capacities.

Every model is then evaluated **per token** on a held-out split, as users run
SAEs downstream: Mutual and Feature Choice in threshold mode after
:func:`sae_lens_choice.calibrate_thresholds` on a separate calibration split;
TopK as is (per token already); BatchTopK through the JumpReLU SAELens exports
it as, twice: with the threshold SAELens saves (its training EMA) and with a
global threshold calibrated on the calibration split exactly as Mutual
Choice's is (the fair comparison).

Python API: :func:`run_demo` returns a :class:`DemoResults`. Command line:
:func:`demo_main` and :func:`zipf_fit_main` (wired into ``sae-lens-choice``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHITECTURES",
    "DemoConfig",
    "DemoError",
    "DemoResults",
    "ModelResult",
    "demo_main",
    "load_sparsity",
    "run_demo",
    "zipf_fit_main",
]

#: The models the demo trains, in table order.
ARCHITECTURES: tuple[str, ...] = (
    "topk",
    "batchtopk",
    "mutual_choice",
    "feature_choice_uniform",
    "feature_choice_zipf",
)

_SPARSITY_FILENAME = "sparsity.safetensors"  # sae_lens.constants.SPARSITY_FILENAME
_LOG10_EPS = 1e-10  # SAELens writes log10(density + 1e-10)


class DemoError(Exception):
    """A usage error: bad settings, or an output path that cannot be written."""


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Settings of one demo run; the defaults take about 3 minutes on 2 CPU cores.

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
        calibration_samples: Held-out activations for threshold calibration.
        eval_samples: Held-out activations for the evaluation.
        firing_zipf_exponent: Exponent of the true features' Zipfian firing probabilities.
        firing_max_prob: Firing probability of the most frequent true feature.
        firing_min_prob: Firing probability of the least frequent true feature.
        firing_magnitude_std: Std of the true features' firing magnitudes (mean 1).
        seed: Seeds the synthetic model, every SAE's initialisation and the data.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: CPU threads for torch during the run (restored afterwards);
            ``None`` leaves torch's setting. The default 1: the demo's matrices
            are small, so a second thread gains little, and when other processes
            share the cores, OpenMP's spinning threads made training 10-20x slower
            in our measurements. Raise it for large ``--scale`` runs.
        architectures: Which of :data:`ARCHITECTURES` to train.
        sweep_k: Extra k values: every architecture is trained again at each, for
            the NMSE-vs-L0 frontier plot.
        output_dir: Where SAEs, ``results.{md,json}`` and plots go.
        show_progress: Progress bars and the printed table.
    """

    d_in: int = 48
    n_features: int = 384
    d_sae: int = 384
    k: float = 4.0
    training_samples: int = 1_048_576
    batch_size: int = 1024
    lr: float = 3e-3
    lr_decay_fraction: float = 0.2
    dead_feature_window: int | None = None
    calibration_samples: int = 32_768
    eval_samples: int = 32_768
    firing_zipf_exponent: float = 1.0
    firing_max_prob: float = 0.3
    firing_min_prob: float = 0.003
    firing_magnitude_std: float = 0.25
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1
    architectures: tuple[str, ...] = ARCHITECTURES
    sweep_k: tuple[float, ...] = ()
    output_dir: str | Path = "demo_output"
    show_progress: bool = True

    def scaled(self, scale: float) -> DemoConfig:
        """A copy with sample counts and widths (d_in, n_features, d_sae) times ``scale``."""
        if not (math.isfinite(scale) and scale > 0):
            raise DemoError(f"--scale must be a finite number > 0, got {scale}")

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
        return self.training_samples // self.batch_size

    def resolved_dead_feature_window(self) -> int:
        if self.dead_feature_window is not None:
            return self.dead_feature_window
        return min(1000, max(10, self.n_steps // 8))

    def all_k(self) -> list[float]:
        """The main k first, then the sweep's other values in increasing order."""
        return [self.k, *sorted({float(k) for k in self.sweep_k} - {float(self.k)})]

    def validate(self) -> None:
        """Raise :class:`DemoError` naming the first bad setting."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DemoError(f"{_flag(name)} must be a positive integer, got {value!r}")

        for name in (
            "d_in",
            "n_features",
            "d_sae",
            "training_samples",
            "batch_size",
            "calibration_samples",
            "eval_samples",
        ):
            positive_int(name)
        if self.training_samples < self.batch_size:
            raise DemoError(
                f"--training-samples ({self.training_samples}) must be at least "
                f"--batch-size ({self.batch_size}): no training step would run"
            )
        if self.dead_feature_window is not None:
            positive_int("dead_feature_window")
        if self.threads is not None:
            positive_int("threads")
        for k in [self.k, *self.sweep_k]:
            if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
                raise DemoError(f"k values must be finite numbers > 0, got {k!r}")
            if k > self.d_sae:
                raise DemoError(f"k = {k} is larger than --d-sae = {self.d_sae}")
            if "topk" in self.architectures and round(k) < 1:
                raise DemoError(f"k = {k} rounds to 0, which topk cannot use")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DemoError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.lr_decay_fraction < 1.0:
            raise DemoError(f"--lr-decay-fraction must be in [0, 1), got {self.lr_decay_fraction}")
        if not (0 < self.firing_min_prob < self.firing_max_prob <= 1):
            raise DemoError(
                "firing probabilities must satisfy 0 < min_prob < max_prob <= 1, got "
                f"min={self.firing_min_prob}, max={self.firing_max_prob}"
            )
        if not self.firing_zipf_exponent > 0:
            raise DemoError(f"firing Zipf exponent must be > 0, got {self.firing_zipf_exponent}")
        if not self.firing_magnitude_std >= 0:
            raise DemoError(f"firing magnitude std must be >= 0, got {self.firing_magnitude_std}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DemoError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if not self.architectures:
            raise DemoError("no architectures selected")
        unknown = [a for a in self.architectures if a not in ARCHITECTURES]
        if unknown:
            raise DemoError(f"unknown architecture(s) {unknown}; choose from {list(ARCHITECTURES)}")
        _check_device(self.device)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def _prepare_output_dir(path: Path) -> Path:
    """Create ``path`` and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sae_lens_choice_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DemoError(f"output directory {str(path)!r} is not writable: {e}") from None
    return path


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

# Seeds of the three splits: disjoint ranges per run seed, one seed per batch,
# so every model sees the same batches whatever else draws random numbers.
_TRAIN, _CALIBRATION, _EVAL = 0, 1 << 40, 2 << 40


class _SyntheticData:
    """SAELens's synthetic model, with seeded, reproducible train/calibration/eval splits."""

    def __init__(self, cfg: DemoConfig):
        from sae_lens.synthetic import (
            SyntheticModel,
            SyntheticModelConfig,
            ZipfianFiringProbabilityConfig,
        )

        self.cfg = cfg
        self.model_cfg = SyntheticModelConfig(
            num_features=cfg.n_features,
            hidden_dim=cfg.d_in,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=cfg.firing_zipf_exponent,
                max_prob=cfg.firing_max_prob,
                min_prob=cfg.firing_min_prob,
            ),
            std_firing_magnitudes=cfg.firing_magnitude_std,
            mean_firing_magnitudes=1.0,
            seed=cfg.seed,
        )
        self.model = SyntheticModel(self.model_cfg, device=cfg.device)
        self.model.feature_dict.eval()
        self.generation_seconds = 0.0

    @property
    def feature_vectors(self) -> torch.Tensor:
        return self.model.feature_dict.feature_vectors.detach()

    @property
    def firing_probabilities(self) -> torch.Tensor:
        return self.model.activation_generator.firing_probabilities.detach()

    @torch.no_grad()
    def batch(self, split: int, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden activations (size, d_in), true feature activations (size, n_features))."""
        from sae_lens.util import temporary_seed

        start = time.perf_counter()
        with temporary_seed((self.cfg.seed * (1 << 42) + split + index) % (1 << 63)):
            features = self.model.activation_generator.sample(size)
            hidden = self.model.feature_dict(features)
        self.generation_seconds += time.perf_counter() - start
        return hidden, features

    def split(self, split: int, n_samples: int) -> tuple[list[torch.Tensor], float]:
        """A held-out split as a list of batches, and its mean true L0."""
        batches, true_l0, n = [], 0.0, 0
        size = self.cfg.batch_size
        for index in range(math.ceil(n_samples / size)):
            b = min(size, n_samples - n)
            hidden, features = self.batch(split, index, b)
            batches.append(hidden)
            true_l0 += float((features > 0).sum())
            n += b
        return batches, true_l0 / max(n, 1)

    def train_provider(self) -> _TrainProvider:
        return _TrainProvider(self)


class _TrainProvider(Iterator[torch.Tensor]):
    """SAELens ``DataProvider``: training batch i is the same for every model."""

    def __init__(self, data: _SyntheticData):
        self.data = data
        self.index = 0
        self.generation_seconds = 0.0

    def __iter__(self) -> _TrainProvider:
        return self

    def __next__(self) -> torch.Tensor:
        before = self.data.generation_seconds
        hidden, _ = self.data.batch(_TRAIN, self.index, self.data.cfg.batch_size)
        self.generation_seconds += self.data.generation_seconds - before
        self.index += 1
        return hidden


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


def _training_config(name: str, cfg: DemoConfig, k: float) -> Any:
    """The SAELens training config of one demo model."""
    from sae_lens import BatchTopKTrainingSAEConfig, TopKTrainingSAEConfig

    from sae_lens_choice import FeatureChoiceTrainingSAEConfig, MutualChoiceTrainingSAEConfig

    common: dict[str, Any] = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "device": cfg.device}
    if name == "topk":
        return TopKTrainingSAEConfig(k=max(1, round(k)), **common)
    if name == "batchtopk":
        return BatchTopKTrainingSAEConfig(k=k, **common)
    if name == "mutual_choice":
        return MutualChoiceTrainingSAEConfig(k=k, aux_loss="aux_zipf", **common)
    if name == "feature_choice_uniform":
        return FeatureChoiceTrainingSAEConfig(k=k, capacity="uniform", **common)
    if name == "feature_choice_zipf":
        return FeatureChoiceTrainingSAEConfig(k=k, capacity="zipf", **common)
    raise DemoError(f"unknown architecture {name!r}")


def _trainer_config(cfg: DemoConfig) -> Any:
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=cfg.n_steps * cfg.batch_size,
        device=cfg.device,
        autocast=False,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=int(cfg.lr_decay_fraction * cfg.n_steps),
        n_restart_cycles=1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        train_batch_size_samples=cfg.batch_size,
        dead_feature_window=cfg.resolved_dead_feature_window(),
        # The sparsity saved with each SAE is that of the last window: the last
        # quarter of training (the trainer resets its counts every window).
        feature_sampling_window=max(1, math.ceil(cfg.n_steps / 4)),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=10,
    )


@contextlib.contextmanager
def _trainer_progress(enabled: bool) -> Iterator[None]:
    """Silence SAETrainer's own tqdm bar when progress output is off."""
    if enabled:
        yield
        return
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.tqdm
    trainer_module.tqdm = functools.partial(original, disable=True)  # type: ignore[assignment]
    try:
        yield
    finally:
        trainer_module.tqdm = original  # type: ignore[assignment]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Trained:
    sae: Any
    seconds: float
    samples: int
    log_feature_sparsity: torch.Tensor


def _train(name: str, cfg: DemoConfig, k: float, data: _SyntheticData, progress: bool) -> _Trained:
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    sae_cfg = _training_config(name, cfg, k)
    sae_class, _ = get_sae_training_class(sae_cfg.architecture())
    torch.manual_seed(cfg.seed)  # same initialisation draw for every model
    sae = sae_class(sae_cfg)
    provider = data.train_provider()
    trainer = SAETrainer(cfg=_trainer_config(cfg), sae=sae, data_provider=provider)
    with _trainer_progress(progress):
        _sync(cfg.device)
        start = time.perf_counter()
        sae = trainer.fit()
        _sync(cfg.device)
        seconds = time.perf_counter() - start - provider.generation_seconds
    return _Trained(
        sae, max(seconds, 1e-9), trainer.n_training_samples, trainer.log_feature_sparsity
    )


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


@dataclass
class ModelResult:
    """Per-token evaluation of one trained SAE on the held-out split.

    ``nmse`` is ``E||x - x_hat||^2 / E||x - E[x]||^2`` (the error relative to
    predicting the mean, as in Gao et al. 2024), so ``nmse = 1 -
    explained_variance``. ``dead_latents`` never fire on the evaluation split.
    ``zipf`` holds the Zipf–Mandelbrot fit of the evaluation densities by rank
    over all ranks (dead latents left out) and over ranks 1%–90% of d_sae.
    """

    name: str
    architecture: str
    k: float
    threshold: str
    path: str
    train_seconds: float
    train_samples: int
    train_samples_per_second: float
    explained_variance: float
    nmse: float
    l0_mean: float
    l0_std: float
    l0_min: int
    l0_max: int
    frac_tokens_zero_l0: float
    dead_latents: int
    mcc: float
    uniqueness: float
    zipf: dict[str, dict[str, float]]
    densities: torch.Tensor = field(repr=False)
    l0_per_token: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        result = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("densities", "l0_per_token")
        }
        return result


def _fit_window(d_sae: int) -> tuple[int, int]:
    """Ranks 1%–90% of d_sae (1-based, inclusive), aux_zipf's default fit window."""
    lo = int(0.01 * d_sae) + 1
    return lo, max(lo, int(0.9 * d_sae))


@torch.no_grad()
def _evaluate(
    sae: Any,
    *,
    name: str,
    k: float,
    threshold: str,
    path: Path,
    trained: _Trained,
    eval_batches: list[torch.Tensor],
    feature_vectors: torch.Tensor,
    progress: bool,
) -> ModelResult:
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import feature_uniqueness, mean_correlation_coefficient
    from tqdm.auto import tqdm

    from sae_lens_choice.zipf import fit_zipf

    sae.eval()
    ev = ExplainedVarianceCalculator()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    l0s = []
    for x in tqdm(eval_batches, desc=f"Evaluating {name}", unit="batch", disable=not progress):
        x = x.to(sae.W_enc.device)
        acts = sae.encode(x)
        ev.add_batch(sae.decode(acts), x)
        active = acts != 0
        l0s.append(active.sum(-1).cpu())
        fired += active.sum(0).cpu().to(torch.float64)
    l0 = torch.cat(l0s).to(torch.float64)
    n_tokens = l0.numel()
    densities = fired / n_tokens
    explained = float(ev.compute())
    decoder = sae.W_dec.detach().float().cpu()
    truth = feature_vectors.float().cpu()
    d_sae = sae.cfg.d_sae
    zipf = {}
    if bool((densities > 0).any()):
        window = _fit_window(d_sae)
        for key, rank_window in (("all_ranks", None), ("ranks_1_90pct", window)):
            try:
                zipf[key] = fit_zipf(densities, rank_window).to_dict()
            except ValueError:
                continue
    return ModelResult(
        name=name,
        architecture=sae.cfg.architecture(),
        k=float(getattr(sae.cfg, "k", k)),
        threshold=threshold,
        path=str(path),
        train_seconds=trained.seconds,
        train_samples=trained.samples,
        train_samples_per_second=trained.samples / trained.seconds,
        explained_variance=explained,
        nmse=1.0 - explained,
        l0_mean=float(l0.mean()),
        l0_std=float(l0.std()) if n_tokens > 1 else 0.0,
        l0_min=int(l0.min()),
        l0_max=int(l0.max()),
        frac_tokens_zero_l0=float((l0 == 0).to(torch.float64).mean()),
        dead_latents=int((fired == 0).sum()),
        mcc=float(mean_correlation_coefficient(decoder, truth)),
        uniqueness=float(feature_uniqueness(decoder, truth)),
        zipf=zipf,
        densities=densities,
        l0_per_token=l0.to(torch.int64),
    )


def _save(sae: Any, path: Path, log_feature_sparsity: torch.Tensor) -> None:
    """SAELens's disk layout: cfg.json, sae_weights.safetensors, sparsity.safetensors.

    A training SAE is saved as its inference model (``save_inference_model``),
    an inference SAE as is (``save_model``). The sparsity is SAELens's
    ``log10(density + 1e-10)`` from the trainer's last sampling window, as
    SAELens's runners write it.
    """
    from sae_lens.saes.sae import TrainingSAE
    from safetensors.torch import save_file

    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(path)
    else:
        sae.save_model(path)
    save_file(
        {"sparsity": log_feature_sparsity.detach().float().cpu().contiguous()},
        path / _SPARSITY_FILENAME,
    )


def _load(path: Path, device: str) -> Any:
    from sae_lens import SAE

    return SAE.load_from_disk(path, device=device)


def _calibrate_global_threshold(jumprelu_sae: Any, k: float, batches: list[torch.Tensor]) -> None:
    """Calibrate a BatchTopK export's global threshold exactly as Mutual Choice's.

    SAELens exports BatchTopK as a JumpReLU SAE whose thresholds all equal one
    value; with the decoder norms folded in, its encoder is the same computation
    as a Mutual Choice inference SAE in threshold mode, so the Mutual Choice
    calibration applies unchanged: load the weights into one, calibrate, copy
    the threshold back.
    """
    from sae_lens_choice import MutualChoiceSAE, MutualChoiceSAEConfig, calibrate_thresholds

    cfg = jumprelu_sae.cfg
    surrogate = MutualChoiceSAE(
        MutualChoiceSAEConfig(
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            k=k,
            dtype=cfg.dtype,
            device=cfg.device,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input,
            normalize_activations=cfg.normalize_activations,
            rescale_acts_by_decoder_norm=False,
        )
    )
    surrogate.load_state_dict(
        {name: jumprelu_sae.state_dict()[name] for name in surrogate.state_dict()}
    )
    calibrate_thresholds(surrogate, batches, show_progress=False)
    with torch.no_grad():
        jumprelu_sae.threshold.copy_(surrogate.threshold)


def _run_models(
    cfg: DemoConfig,
    k: float,
    data: _SyntheticData,
    calibration: list[torch.Tensor],
    evaluation: list[torch.Tensor],
    out_dir: Path,
    console: Any,
) -> list[ModelResult]:
    from sae_lens_choice import calibrate_thresholds

    progress = cfg.show_progress
    results = []
    evaluate = functools.partial(
        _evaluate,
        k=k,
        eval_batches=evaluation,
        feature_vectors=data.feature_vectors,
        progress=progress,
    )
    for i, name in enumerate(cfg.architectures, start=1):
        if console is not None:
            console.print(
                f"[bold]k={k:g} · training {name}[/] ({i}/{len(cfg.architectures)}) "
                f"on {cfg.n_steps * cfg.batch_size:,} samples"
            )
        trained = _train(name, cfg, k, data, progress)
        path = out_dir / name
        if name in ("mutual_choice", "feature_choice_uniform", "feature_choice_zipf"):
            calibrate_thresholds(trained.sae, calibration, show_progress=progress)
            _save(trained.sae, path, trained.log_feature_sparsity)
            sae = _load(path, cfg.device)
            sae.cfg.inference_mode = "threshold"
            results.append(
                evaluate(sae, name=name, threshold="calibrated", path=path, trained=trained)
            )
        elif name == "topk":
            _save(trained.sae, path, trained.log_feature_sparsity)
            sae = _load(path, cfg.device)
            results.append(
                evaluate(sae, name=name, threshold="per-token top-k", path=path, trained=trained)
            )
        else:
            # batchtopk: SAELens exports it as a JumpReLU SAE with its training-EMA
            # threshold (kept as batchtopk_ema); the main row recalibrates that
            # global threshold on the calibration split exactly as mutual_choice's.
            ema_path = out_dir / "batchtopk_ema"
            _save(trained.sae, ema_path, trained.log_feature_sparsity)
            sae = _load(ema_path, cfg.device)
            ema_result = evaluate(
                sae,
                name="batchtopk_ema",
                threshold="training EMA, as SAELens saves it",
                path=ema_path,
                trained=trained,
            )
            _calibrate_global_threshold(sae, k, calibration)
            _save(sae, path, trained.log_feature_sparsity)
            results.append(
                evaluate(
                    sae,
                    name="batchtopk",
                    threshold="calibrated (global, as mutual_choice)",
                    path=path,
                    trained=trained,
                )
            )
            results.append(ema_result)
    return results


# ---------------------------------------------------------------------------
# results, table, plots
# ---------------------------------------------------------------------------


@dataclass
class DemoResults:
    """What :func:`run_demo` returns; ``to_dict()`` is what ``results.json`` holds."""

    config: DemoConfig
    data: dict[str, Any]
    models: list[ModelResult]
    sweep: list[ModelResult]
    output_dir: Path
    files: dict[str, str]
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
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
        cfg = self.config
        lines = [
            "# sae-lens-choice demo results",
            "",
            f"Synthetic data (`sae_lens.synthetic`): {cfg.n_features} true features in "
            f"d_in = {cfg.d_in} dimensions, Zipfian firing probabilities "
            f"({cfg.firing_max_prob} … {cfg.firing_min_prob}, exponent "
            f"{cfg.firing_zipf_exponent}), true L0 = {self.data['true_l0_eval']:.2f} per token.",
            f"SAEs: d_sae = {cfg.d_sae}, k = {cfg.k:g}, trained on "
            f"{cfg.n_steps * cfg.batch_size:,} samples (batch {cfg.batch_size}, lr {cfg.lr:g}, "
            f"seed {cfg.seed}) with SAELens's `SAETrainer`, same initialisation seed and "
            "data order for every model.",
            f"Evaluated per token on {self.data['eval_samples']:,} held-out samples; "
            f"thresholds calibrated on {self.data['calibration_samples']:,} others.",
            "",
            _markdown_table(self.models),
            "",
            "Columns: EV = explained variance; NMSE = E‖x − x̂‖² / E‖x − E[x]‖² (= 1 − EV); "
            "L0 = active latents per token (mean, std over tokens); dead = latents that never "
            "fire on the evaluation split; MCC = mean correlation coefficient between decoder "
            "rows and true features (`sae_lens.synthetic.mean_correlation_coefficient`); "
            "Zipf α, R² = Zipf–Mandelbrot fit of the evaluation densities by rank over ranks "
            "1%–90% of d_sae (dead latents excluded; all-ranks fits are in results.json); "
            "samples/s = training throughput (data generation excluded).",
            "",
            "Thresholds: " + "; ".join(f"{m.name}: {m.threshold}" for m in self.models) + ".",
        ]
        if self.sweep:
            lines += ["", "## k sweep", "", _markdown_table(self.sweep, with_k=True)]
        lines += ["", "## Files", ""]
        lines += [f"- {key}: `{value}`" for key, value in self.files.items()]
        return "\n".join(lines) + "\n"


_COLUMNS = (
    ("model", "{}"),
    ("EV", "{:.4f}"),
    ("NMSE", "{:.4f}"),
    ("L0 mean", "{:.2f}"),
    ("L0 std", "{:.2f}"),
    ("dead", "{}"),
    ("MCC", "{:.3f}"),
    ("Zipf α", "{}"),
    ("Zipf R²", "{}"),
    ("samples/s", "{:,.0f}"),
)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _display_fit(m: ModelResult) -> dict[str, float] | None:
    # The middle window, as aux_zipf fits it: the dense head and the dying tail
    # bend away from any power law and would dominate an all-ranks fit.
    return m.zipf.get("ranks_1_90pct") or m.zipf.get("all_ranks")


def _row(m: ModelResult, with_k: bool = False) -> list[str]:
    fit = _display_fit(m)
    alpha = f"{fit['alpha']:.2f}" if fit else "–"
    r2 = f"{fit['r2']:.3f}" if fit else "–"
    row = [
        m.name,
        f"{m.explained_variance:.4f}",
        f"{m.nmse:.4f}",
        f"{m.l0_mean:.2f}",
        f"{m.l0_std:.2f}",
        str(m.dead_latents),
        f"{m.mcc:.3f}",
        alpha,
        r2,
        f"{m.train_samples_per_second:,.0f}",
    ]
    return [f"{m.k:g}", *row] if with_k else row


def _markdown_table(models: list[ModelResult], with_k: bool = False) -> str:
    header = (["k"] if with_k else []) + [c for c, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(m, with_k)) + " |" for m in models]
    return "\n".join(lines)


def _rich_table(models: list[ModelResult], title: str, with_k: bool = False) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate((["k"] if with_k else []) + [c for c, _ in _COLUMNS]):
        table.add_column(col, justify="left" if (i == 0 and not with_k) else "right")
    for m in models:
        table.add_row(*_row(m, with_k))
    return table


def _new_figure(width: float = 7.0, height: float = 4.5) -> Any:
    # The object-oriented API renders with Agg and touches no global backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _fit_curve(
    sorted_densities: torch.Tensor, lo: int, hi: int, fit: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitted law over ranks lo..hi, computed in log space.

    With a large beta the fitted C overflows float64 (alpha ~ 100 happens when
    the densities fall off a cliff); the least-squares line passes through the
    mean of the fitted points, which gives log C without it.
    """
    r = torch.arange(lo, hi + 1, dtype=torch.float64)
    log_x = torch.log(r + fit["beta"])
    log_d = torch.log(sorted_densities[lo - 1 : hi].to(torch.float64))
    log_c = (log_d + fit["alpha"] * log_x).mean()
    return r, torch.exp(log_c - fit["alpha"] * log_x)


def _plot_densities(models: list[ModelResult], true_probs: torch.Tensor, path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    truth = torch.sort(true_probs.double().cpu(), descending=True).values
    ranks = torch.arange(1, truth.numel() + 1)
    ax.plot(ranks, truth, color="black", lw=2, alpha=0.4, label="true features (firing prob.)")
    for i, m in enumerate(models):
        color = f"C{i}"
        d = torch.sort(m.densities, descending=True).values
        d = d[d > 0]
        if d.numel() == 0:
            continue
        r = torch.arange(1, d.numel() + 1)
        fit = _display_fit(m)
        label = m.name
        if fit:
            label += f"  (α={fit['alpha']:.2f}, β={fit['beta']:.1f}, R²={fit['r2']:.3f})"
        ax.plot(r, d, color=color, lw=1.5, label=label)
        if fit:
            lo, hi = _fit_window(m.densities.numel())
            hi = min(hi, d.numel())
            if hi >= lo:
                ax.plot(*_fit_curve(d, lo, hi, fit), color=color, lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latent rank (by density)")
    ax.set_ylabel("firing density on eval split")
    ax.set_title("Latent density by rank; dashed: Zipf–Mandelbrot fit (ranks 1%–90%)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def _plot_l0_histograms(models: list[ModelResult], path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    # up to the 99.9th percentile: a few outlier tokens would squash the rest
    top = max(int(torch.quantile(m.l0_per_token.double(), 0.999)) for m in models) + 1
    bins = torch.arange(-0.5, top + 1.5, 1.0).tolist()
    for i, m in enumerate(models):
        ax.hist(
            m.l0_per_token.numpy(),
            bins=bins,
            histtype="step",
            lw=1.5,
            color=f"C{i}",
            label=f"{m.name} (mean {m.l0_mean:.2f}, std {m.l0_std:.2f})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title("Per-token L0 on the eval split (threshold inference)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def _plot_frontier(rows: list[ModelResult], path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    names = list(dict.fromkeys(m.name for m in rows))
    for i, name in enumerate(names):
        pts = sorted((m.l0_mean, m.nmse) for m in rows if m.name == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean L0 per token (eval, threshold inference)")
    ax.set_ylabel("NMSE (1 − explained variance)")
    ax.set_title("Sparsity–reconstruction frontier")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------


def run_demo(config: DemoConfig | None = None, **overrides: Any) -> DemoResults:
    """Train, calibrate, evaluate and save the demo's SAEs; write table, JSON and plots.

    Args:
        config: the settings (default :class:`DemoConfig`).
        **overrides: fields of :class:`DemoConfig` replacing those of ``config``
            (``run_demo(k=8, output_dir="out")``).

    Returns:
        :class:`DemoResults` (per-model metrics, paths of every file written).

    Raises:
        DemoError: a bad setting or an unwritable output directory (before any
            training starts).
    """
    start = time.perf_counter()
    cfg = dataclasses.replace(config or DemoConfig(), **overrides)
    cfg.architectures = tuple(cfg.architectures)
    cfg.sweep_k = tuple(float(k) for k in cfg.sweep_k)
    cfg.validate()
    for k in cfg.all_k():
        for name in cfg.architectures:
            try:
                _training_config(name, cfg, k)
            except ValueError as e:
                raise DemoError(f"{name} at k={k:g}: {e}") from None
    out_dir = _prepare_output_dir(Path(cfg.output_dir))
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_demo(cfg, out_dir, start)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(cfg: DemoConfig, out_dir: Path, start: float) -> DemoResults:
    sae_dir = out_dir / "saes"

    console = None
    if cfg.show_progress:
        from rich.console import Console

        # Off a terminal rich would wrap the table at 80 columns.
        console = Console(width=None if sys.stdout.isatty() else 132)
        console.print(
            f"[bold]sae-lens-choice demo[/]: {cfg.n_features} true features in d_in={cfg.d_in}, "
            f"d_sae={cfg.d_sae}, k={cfg.k:g}, {cfg.n_steps * cfg.batch_size:,} training samples "
            f"per model, device {cfg.device}"
        )

    with torch.no_grad():
        data = _SyntheticData(cfg)
        calibration, _ = data.split(_CALIBRATION, cfg.calibration_samples)
        evaluation, true_l0 = data.split(_EVAL, cfg.eval_samples)
    data_info = {
        "true_l0_eval": true_l0,
        "true_l0_expected": float(data.firing_probabilities.sum()),
        "n_features": cfg.n_features,
        "d_in": cfg.d_in,
        "calibration_samples": cfg.calibration_samples,
        "eval_samples": cfg.eval_samples,
        "synthetic_model": data.model_cfg.to_dict(),
    }

    models = _run_models(cfg, cfg.k, data, calibration, evaluation, sae_dir, console)
    sweep: list[ModelResult] = []
    if cfg.sweep_k:
        sweep = list(models)
        for k in cfg.all_k()[1:]:
            sweep += _run_models(
                cfg, k, data, calibration, evaluation, sae_dir / f"k{k:g}", console
            )

    files = {
        "results_md": str(out_dir / "results.md"),
        "results_json": str(out_dir / "results.json"),
        "density_plot": str(out_dir / "latent_density_by_rank.png"),
        "l0_histogram_plot": str(out_dir / "l0_per_token_histogram.png"),
        "saes": str(sae_dir),
    }
    _plot_densities(models, data.firing_probabilities, Path(files["density_plot"]))
    _plot_l0_histograms(models, Path(files["l0_histogram_plot"]))
    if sweep:
        files["frontier_plot"] = str(out_dir / "nmse_vs_l0_frontier.png")
        _plot_frontier(sweep, Path(files["frontier_plot"]))

    results = DemoResults(
        config=cfg,
        data=data_info,
        models=models,
        sweep=sweep,
        output_dir=out_dir,
        files=files,
        wall_seconds=0.0,
    )
    results.wall_seconds = time.perf_counter() - start
    Path(files["results_md"]).write_text(results.to_markdown())
    Path(files["results_json"]).write_text(
        json.dumps(_finite_or_none(results.to_dict()), indent=2, allow_nan=False)
    )

    if console is not None:
        console.print(_rich_table(models, f"k = {cfg.k:g}, per-token (threshold) inference"))
        if sweep:
            console.print(_rich_table(sweep, "k sweep", with_k=True))
        example = sae_dir / "mutual_choice"
        if not example.exists():
            example = Path(models[0].path)
        console.print(
            f"Results: {files['results_md']}, {files['results_json']}; plots in {out_dir}.\n"
            f"SAEs (SAELens format, with sparsity.safetensors) under {sae_dir}. Load one with:\n"
            f"    import sae_lens_choice  # registers mutual_choice / feature_choice\n"
            f"    from sae_lens import SAE\n"
            f"    sae = SAE.load_from_disk({str(example)!r})\n"
            f"Demo wall time: {results.wall_seconds:.1f} s"
        )
    return results


# ---------------------------------------------------------------------------
# command line: demo
# ---------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def demo_parser(prog: str = "sae-lens-choice demo") -> argparse.ArgumentParser:
    """The ``demo`` subcommand's argument parser."""
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train TopK, BatchTopK, Mutual Choice and Feature Choice (uniform and Zipf "
            "capacities) SAEs on SAELens synthetic data with known ground truth, evaluate "
            "them per token after threshold calibration, and write a results table, JSON, "
            "plots and the SAEs (SAELens format)."
        ),
    )
    p.add_argument("--output-dir", default=str(d.output_dir), help="default: %(default)s")
    p.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="multiply sample counts and widths (d_in, n_features, d_sae) by this; explicit "
        "flags below override (default: %(default)s)",
    )
    p.add_argument("--d-in", type=_positive_int, help=f"activation width (default {d.d_in})")
    p.add_argument(
        "--n-features", type=_positive_int, help=f"true features (default {d.n_features})"
    )
    p.add_argument("--d-sae", type=_positive_int, help=f"SAE latents (default {d.d_sae})")
    p.add_argument("--k", type=_positive_float, help=f"expected L0 per token (default {d.k:g})")
    p.add_argument(
        "--training-samples",
        type=_positive_int,
        help=f"training samples per model (default {d.training_samples})",
    )
    p.add_argument("--batch-size", type=_positive_int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=_positive_float, help=f"learning rate (default {d.lr:g})")
    p.add_argument(
        "--dead-feature-window",
        type=_positive_int,
        help="steps without firing before a latent counts as dead (default: an eighth of "
        "the steps, 10..1000)",
    )
    p.add_argument(
        "--calibration-samples", type=_positive_int, help=f"default {d.calibration_samples}"
    )
    p.add_argument("--eval-samples", type=_positive_int, help=f"default {d.eval_samples}")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed, help="default: %(default)s")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=d.threads,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s, see "
        "DemoConfig.threads)",
    )
    p.add_argument(
        "--architectures",
        nargs="+",
        choices=ARCHITECTURES,
        default=list(ARCHITECTURES),
        metavar="ARCH",
        help=f"subset of {', '.join(ARCHITECTURES)} (default: all)",
    )
    p.add_argument(
        "--sweep-k",
        nargs="+",
        type=_positive_float,
        default=[],
        metavar="K",
        help="also train every architecture at these k and plot the NMSE-vs-L0 frontier",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


def _config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig().scaled(args.scale) if args.scale != 1.0 else DemoConfig()
    explicit = {
        name: getattr(args, name)
        for name in (
            "d_in",
            "n_features",
            "d_sae",
            "k",
            "training_samples",
            "batch_size",
            "lr",
            "dead_feature_window",
            "calibration_samples",
            "eval_samples",
        )
        if getattr(args, name) is not None
    }
    return dataclasses.replace(
        cfg,
        **explicit,
        seed=args.seed,
        device=args.device,
        threads=args.threads or None,
        architectures=tuple(args.architectures),
        sweep_k=tuple(args.sweep_k),
        output_dir=args.output_dir,
        show_progress=not args.quiet,
    )


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def demo_main(argv: list[str] | None = None) -> int:
    """``sae-lens-choice demo [flags]``; returns the exit code (2 on bad flags)."""
    parser = demo_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        run_demo(_config_from_args(args))
    except DemoError as e:
        return _error(parser.prog, str(e))
    return 0


# ---------------------------------------------------------------------------
# command line: zipf-fit
# ---------------------------------------------------------------------------


def load_sparsity(path: str | Path) -> torch.Tensor:
    """Feature densities (float64) from a SAELens ``sparsity.safetensors``.

    SAELens stores ``log10(density + 1e-10)``; latents at that floor are dead
    and come back as exactly 0.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "sparsity" not in tensors:
        raise DemoError(
            f"{path} holds no 'sparsity' tensor (found {sorted(tensors)}); expected SAELens's "
            "sparsity.safetensors"
        )
    log10 = tensors["sparsity"].to(torch.float64).flatten()
    if log10.numel() == 0:
        raise DemoError(f"{path}: the 'sparsity' tensor is empty")
    if not bool(torch.isfinite(log10).all()):
        raise DemoError(f"{path}: the 'sparsity' tensor holds NaN or inf")
    densities = (10.0**log10 - _LOG10_EPS).clamp(min=0.0)
    densities[log10 <= math.log10(_LOG10_EPS) + 1e-6] = 0.0
    return densities


def _find_sparsity_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob(_SPARSITY_FILENAME))
    raise DemoError(f"{str(path)!r} does not exist")


def zipf_fit_parser(prog: str = "sae-lens-choice zipf-fit") -> argparse.ArgumentParser:
    """The ``zipf-fit`` subcommand's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fit a Zipf–Mandelbrot law p(r) = C / (r + beta)^alpha to the latent densities of "
            "saved SAEs (SAELens's sparsity.safetensors, log10 densities) and plot density by "
            "rank. PATH is a sparsity.safetensors file or a directory searched recursively."
        ),
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--rank-window",
        nargs=2,
        type=_positive_int,
        metavar=("LO", "HI"),
        help="1-based inclusive ranks to fit on (default: all ranks)",
    )
    p.add_argument(
        "--output", default="zipf_fit.png", help="PNG plot to write (default: %(default)s)"
    )
    return p


def zipf_fit_main(argv: list[str] | None = None) -> int:
    """``sae-lens-choice zipf-fit PATH``; returns the exit code (2 on bad input)."""
    from sae_lens_choice.zipf import fit_zipf

    parser = zipf_fit_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    window: tuple[int, int] | None = None
    if args.rank_window is not None:
        lo, hi = args.rank_window
        if hi < lo:
            return _error(parser.prog, f"--rank-window needs LO <= HI, got {lo} {hi}")
        window = (lo, hi)
    try:
        files = _find_sparsity_files(Path(args.path))
        if not files:
            raise DemoError(f"no {_SPARSITY_FILENAME} found under {args.path!r}")
        output = Path(args.output)
        if output.parent != Path() and not output.parent.is_dir():
            _prepare_output_dir(output.parent)
        curves = []
        for f in files:
            try:
                densities = load_sparsity(f)
            except DemoError:
                raise
            except Exception as e:  # a corrupt or foreign file
                raise DemoError(f"cannot read {f}: {e}") from None
            if not bool((densities > 0).any()):
                raise DemoError(f"{f}: every latent is dead (density 0); nothing to fit")
            if window is not None and window[0] > densities.numel():
                raise DemoError(
                    f"--rank-window {window[0]} {window[1]}: {f} has only "
                    f"{densities.numel()} latents"
                )
            fit_all = fit_zipf(densities)
            fit_win = fit_zipf(densities, window) if window is not None else fit_all
            curves.append((f, densities, fit_win, fit_all))
    except DemoError as e:
        return _error(parser.prog, str(e))

    root = Path(args.path)
    win_text = f"ranks {window[0]}–{window[1]}" if window else "all ranks"
    for f, densities, fit_win, fit_all in curves:
        name = str(f.parent.relative_to(root)) if root.is_dir() else str(f)
        n_dead = int((densities == 0).sum())
        print(f"{name}  ({densities.numel()} latents, {n_dead} dead)")
        for label, fit in ((win_text, fit_win), ("all ranks", fit_all)):
            v = fit.to_dict()
            print(
                f"  {label:>18}: alpha={v['alpha']:.4f}  beta={v['beta']:.4f}  "
                f"R^2={v['r2']:.4f}  (n={int(v['n_points'])})"
            )
            if window is None:
                break

    fig = _new_figure()
    ax = fig.add_subplot()
    for i, (f, densities, fit_win, _) in enumerate(curves):
        color = f"C{i % 10}"
        d = torch.sort(densities, descending=True).values
        d = d[d > 0]
        r = torch.arange(1, d.numel() + 1)
        name = str(f.parent.relative_to(root)) if root.is_dir() else f.parent.name
        v = fit_win.to_dict()
        ax.plot(r, d, color=color, lw=1.5, label=f"{name} (α={v['alpha']:.2f}, R²={v['r2']:.3f})")
        lo, hi = window if window else (1, d.numel())
        hi = min(hi, d.numel())
        if hi >= lo:
            ax.plot(*_fit_curve(d, lo, hi, v), color=color, lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latent rank (by density)")
    ax.set_ylabel("firing density")
    ax.set_title(f"Latent density by rank; dashed: Zipf–Mandelbrot fit ({win_text})")
    ax.legend(fontsize=7)
    try:
        fig.savefig(output, dpi=120)
    except OSError as e:
        return _error(parser.prog, f"cannot write {str(output)!r}: {e}")
    print(f"plot: {output}")
    return 0
