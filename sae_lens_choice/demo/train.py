"""Training one demo model with SAELens's own ``SAETrainer``.

Every model gets the same initialisation seed, the same batches in the same
order and the same learning-rate schedule; only the architecture differs.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_choice.demo.architectures import ARCHITECTURE_TABLE
from sae_lens_choice.demo.config import DemoConfig
from sae_lens_choice.demo.data import SyntheticData

__all__ = ["TrainedModel", "model_config", "quiet_progress", "train_model", "trainer_config"]

#: Modules whose tqdm bars run inside training and saving.
_PROGRESS_MODULES = ("sae_lens.training.sae_trainer", "sae_lens_choice.calibration")


def model_config(name: str, cfg: DemoConfig, k: float) -> Any:
    """The SAELens training config of demo model ``name`` at ``k``."""
    return ARCHITECTURE_TABLE[name].training_config(
        d_in=cfg.d_in, d_sae=cfg.d_sae, k=k, device=cfg.device
    )


def trainer_config(cfg: DemoConfig) -> SAETrainerConfig:
    """SAELens trainer settings shared by every model: lr schedule, windows, no checkpoints."""
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
def quiet_progress(enabled: bool) -> Iterator[None]:
    """Silence the tqdm bars of SAELens's trainer and of saving when progress is off.

    Neither takes a switch (saving calibrates thresholds with a bar), and tqdm
    reads its environment overrides once, at import.
    """
    if enabled:
        yield
        return
    modules = [importlib.import_module(name) for name in _PROGRESS_MODULES]
    originals = [module.tqdm for module in modules]
    for module, original in zip(modules, originals):
        # (a partial's disable=True would lose to an explicit disable= argument)
        module.tqdm = _disabled(original)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.tqdm = original  # type: ignore[attr-defined]


def _disabled(tqdm_class: Any) -> Callable[..., Any]:
    def quiet(*args: Any, **kwargs: Any) -> Any:
        return tqdm_class(*args, **{**kwargs, "disable": True})

    return quiet


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainedModel:
    """A trained SAE, its training time (data generation excluded) and densities."""

    sae: Any
    seconds: float
    samples: int
    log_feature_sparsity: torch.Tensor


def train_model(name: str, cfg: DemoConfig, k: float, data: SyntheticData) -> TrainedModel:
    """Train demo model ``name`` at ``k`` on the training split."""
    sae_cfg = model_config(name, cfg, k)
    sae_class, _ = get_sae_training_class(sae_cfg.architecture())
    torch.manual_seed(cfg.seed)  # the same initialisation draw for every model
    sae = sae_class(sae_cfg)
    provider = data.train_provider()
    trainer = SAETrainer(cfg=trainer_config(cfg), sae=sae, data_provider=provider)
    _sync(cfg.device)
    start = time.perf_counter()
    sae = trainer.fit()
    _sync(cfg.device)
    seconds = time.perf_counter() - start - provider.generation_seconds
    return TrainedModel(
        sae, max(seconds, 1e-9), trainer.n_training_samples, trainer.log_feature_sparsity
    )
