"""SAELens's folder layout: saving a SAE with its densities, reading densities back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.saes.sae import SAE, TrainingSAE
from safetensors.torch import load_file, save_file

from sae_lens_choice.demo.config import DemoError

__all__ = ["find_sparsity_files", "load_sparsity", "save_sae"]

#: SAELens writes log10(density + 1e-10).
_LOG10_EPS = 1e-10


def save_sae(sae: SAE[Any], path: Path, log_feature_sparsity: torch.Tensor) -> None:
    """Write ``cfg.json``, ``sae_weights.safetensors`` and ``sparsity.safetensors``.

    A training SAE is saved as its inference model (``save_inference_model``:
    SAELens's own ``jumprelu`` for BatchTopK, Mutual and Feature Choice), an
    inference SAE as it is (``save_model``). The sparsity is SAELens's
    ``log10(density + 1e-10)``, as its runners write it.
    """
    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(path)
    else:
        sae.save_model(path)
    save_file(
        {"sparsity": log_feature_sparsity.detach().float().cpu().contiguous()},
        path / SPARSITY_FILENAME,
    )


def load_sparsity(path: str | Path) -> torch.Tensor:
    """Feature densities (float64) from a SAELens ``sparsity.safetensors``.

    SAELens stores ``log10(density + 1e-10)``; latents at that floor are dead
    and come back as exactly 0.

    Raises:
        DemoError: no ``sparsity`` tensor, an empty one, or NaN / inf in it.
    """
    tensors = load_file(str(path))
    if "sparsity" not in tensors:
        raise DemoError(
            f"{path} holds no 'sparsity' tensor (found {sorted(tensors)}); expected SAELens's "
            f"{SPARSITY_FILENAME}"
        )
    log10 = tensors["sparsity"].to(torch.float64).flatten()
    if log10.numel() == 0:
        raise DemoError(f"{path}: the 'sparsity' tensor is empty")
    if not bool(torch.isfinite(log10).all()):
        raise DemoError(f"{path}: the 'sparsity' tensor holds NaN or inf")
    densities = (10.0**log10 - _LOG10_EPS).clamp(min=0.0)
    densities[log10 <= math.log10(_LOG10_EPS) + 1e-6] = 0.0
    return densities


def find_sparsity_files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every ``sparsity.safetensors`` below it."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(path.rglob(SPARSITY_FILENAME))
    raise DemoError(f"{str(path)!r} does not exist")
