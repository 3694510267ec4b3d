"""Factories every test file uses (SAELens's ``tests/helpers.py`` is the model).

Real classes only: SAEs are built from their real configs, data comes from a
fixed random dictionary (sparse codes plus noise) or SAELens's synthetic
model, language models are tiny real ``HookedTransformer``s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.saes.sae import SAE, SAEMetadata, TrainStepInput, TrainStepOutput

from sae_lens_choice import REGISTRATIONS

ARCHS = ("mutual_choice", "feature_choice")
REPO_ROOT = Path(__file__).resolve().parents[1]

#: architecture -> (SAE class, config class), as the package registers them
TRAINING_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    arch: classes for kind, arch, classes in REGISTRATIONS if kind == "training"
}
#: the 0.1.0 inference classes (loading old folders)
LEGACY_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    arch: classes for kind, arch, classes in REGISTRATIONS if kind == "inference"
}


def sparse_activations(
    n_tokens: int,
    seed: int,
    d_in: int = 16,
    *,
    n_atoms: int = 128,
    density: float = 0.05,
    scale: float = 1.0,
) -> torch.Tensor:
    """(n_tokens, d_in) sparse non-negative codes over a fixed dictionary plus noise.

    The dictionary depends on ``d_in`` and ``n_atoms`` only, so different seeds
    are held-out samples of one distribution.
    """
    dictionary = torch.randn(n_atoms, d_in, generator=torch.Generator().manual_seed(1234))
    dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n_tokens, n_atoms, generator=g) < density
    magnitude = torch.empty(n_tokens, n_atoms).exponential_(1.0, generator=g)
    noise = 0.05 * torch.randn(n_tokens, d_in, generator=g)
    return scale * ((active * magnitude) @ dictionary + noise)


@torch.no_grad()
def randomize_weights(sae: SAE[Any], seed: int, *, b_enc: float = 0.0) -> SAE[Any]:
    """Random weights with decoder rows of varying norm (so rescaling matters)."""
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    g = torch.Generator().manual_seed(seed)
    dtype = sae.W_enc.dtype
    sae.W_enc.copy_((torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in)).to(dtype))
    sae.b_enc.copy_((b_enc + 0.1 * torch.randn(d_sae, generator=g)).to(dtype))  # type: ignore[union-attr]
    row_norms = 0.5 + torch.rand(d_sae, 1, generator=g)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    sae.W_dec.copy_((W_dec / W_dec.norm(dim=-1, keepdim=True) * row_norms).to(dtype))
    sae.b_dec.copy_((0.01 * torch.randn(d_in, generator=g)).to(dtype))
    return sae


def make_training_sae(
    arch: str, *, d_in: int = 8, d_sae: int = 32, k: float = 4, seed: int = 0, **overrides: Any
) -> Any:
    """A training SAE of ``arch`` with SAELens's own initialisation under ``seed``."""
    sae_class, cfg_class = TRAINING_CLASSES[arch]
    torch.manual_seed(seed)
    return sae_class(cfg_class(d_in=d_in, d_sae=d_sae, k=k, **overrides))


def make_legacy_sae(
    arch: str,
    *,
    d_in: int = 16,
    d_sae: int = 64,
    k: float = 4,
    seed: int = 0,
    b_enc: float = 0.0,
    threshold: float = 0.3,
    metadata: SAEMetadata | None = None,
    **overrides: Any,
) -> Any:
    """A 0.1.0 inference SAE (``mutual_choice``/``feature_choice`` architecture), random."""
    sae_class, cfg_class = LEGACY_CLASSES[arch]
    cfg = cfg_class(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        metadata=metadata or SAEMetadata(hook_name=None, context_size=16, prepend_bos=False),
        **overrides,
    )
    sae: Any = randomize_weights(sae_class(cfg), seed, b_enc=b_enc)
    with torch.no_grad():
        sae.threshold.fill_(threshold)
    return sae


def step_input(
    sae: Any,
    sae_in: torch.Tensor,
    *,
    n_training_steps: int = 0,
    is_logging_step: bool = True,
    dead_neuron_mask: torch.Tensor | None = None,
) -> TrainStepInput:
    """What SAELens's trainer passes to ``training_forward_pass``."""
    if dead_neuron_mask is None:
        dead_neuron_mask = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae_in.device)
    return TrainStepInput(
        sae_in=sae_in,
        coefficients={},
        dead_neuron_mask=dead_neuron_mask,
        n_training_steps=n_training_steps,
        is_logging_step=is_logging_step,
    )


def train_step(sae: Any, sae_in: torch.Tensor, **kwargs: Any) -> TrainStepOutput:
    """One ``training_forward_pass`` (no backward)."""
    return sae.training_forward_pass(step_input(sae, sae_in, **kwargs))


def train(sae: Any, batches: list[torch.Tensor], *, lr: float = 1e-3, first_step: int = 0) -> Any:
    """A few real optimiser steps: forward, backward, Adam, as SAELens's trainer does."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for i, batch in enumerate(batches):
        out = train_step(sae, batch, n_training_steps=first_step + i, is_logging_step=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return sae


def l0(acts: torch.Tensor) -> torch.Tensor:
    """Active latents per token, float64."""
    return (acts.reshape(-1, acts.shape[-1]) != 0).sum(-1).to(torch.float64)


def tiny_model(
    *,
    d_model: int = 16,
    n_layers: int = 1,
    n_ctx: int = 16,
    d_vocab: int = 64,
    hooked_sae: bool = False,
) -> Any:
    """A tiny real HookedTransformer (random weights, no tokenizer, no download).

    ``hooked_sae`` gives a ``HookedSAETransformer`` (for ``run_with_saes``).
    """
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=4, n_heads=d_model // 4,
        d_mlp=2 * d_model, d_vocab=d_vocab, act_fn="relu", seed=0, device="cpu",
    )  # fmt: skip
    model_class = HookedSAETransformer if hooked_sae else HookedTransformer
    return model_class(cfg).eval()


def token_rows(n_rows: int, seed: int, *, n_ctx: int = 16, d_vocab: int = 64) -> torch.Tensor:
    """(n_rows, n_ctx) random token ids."""
    return torch.randint(0, d_vocab, (n_rows, n_ctx), generator=torch.Generator().manual_seed(seed))


#: Where the runner tests hook :func:`tiny_model`: its one block's residual output.
TINY_HOOK = "blocks.0.hook_resid_post"


def token_dataset(n_rows: int = 64, *, seed: int = 0) -> Any:
    """A local tokenized dataset for SAELens's runners and :func:`tiny_model`.

    ``n_rows`` rows of 16 random token ids in [1, 64) under ``seed``.
    """
    import datasets

    tokens = torch.randint(1, 64, (n_rows, 16), generator=torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict({"input_ids": tokens.tolist()})


def runner_config(sae_cfg: Any, tmp: Path, **overrides: Any) -> LanguageModelSAERunnerConfig[Any]:
    """SAELens's runner config training ``sae_cfg`` on :func:`tiny_model` and :func:`token_dataset`.

    24 steps of 64 tokens, no checkpoints, no wandb, everything written under
    ``tmp``; ``overrides`` replace any field (as SAELens's test helpers do).
    The model and dataset names are placeholders: pass the real ones to the
    runner as ``override_model`` / ``override_dataset``.
    """
    kwargs: dict[str, Any] = {
        "sae": sae_cfg,
        "model_name": "tiny-random",
        "hook_name": TINY_HOOK,
        "dataset_path": "local-token-ids",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": 16,
        "prepend_bos": False,
        # buffer = n_batches_in_buffer * context_size tokens >= the batch
        "n_batches_in_buffer": 8,
        "store_batch_size_prompts": 8,
        "train_batch_size_tokens": 64,
        "training_tokens": 64 * 24,
        "dead_feature_window": 5,
        "feature_sampling_window": 10,
        "lr": 3e-3,
        "n_checkpoints": 0,
        "checkpoint_path": str(tmp / "checkpoints"),
        "output_path": str(tmp / "output"),
        "logger": LoggingConfig(log_to_wandb=False),
        "seed": 0,
    }
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)


def make_trained_sae(
    arch: str,
    *,
    n_steps: int = 30,
    batch_size: int = 256,
    lr: float = 3e-3,
    d_in: int = 16,
    d_sae: int = 64,
    k: float = 4,
    **overrides: Any,
) -> Any:
    """A training SAE of ``arch`` after ``n_steps`` real Adam steps on :func:`sparse_activations`.

    Batch ``i`` is ``sparse_activations(batch_size, seed=i, d_in=d_in)``, so the
    most recent training tokens (what the saved thresholds are calibrated on)
    can be rebuilt by a test.
    """
    sae = make_training_sae(arch, d_in=d_in, d_sae=d_sae, k=k, **overrides)
    batches = [sparse_activations(batch_size, seed=i, d_in=d_in) for i in range(n_steps)]
    return train(sae, batches, lr=lr)


def save_legacy_folder(
    path: Path, arch: str, *, calibrate_on: torch.Tensor | None = None, **kwargs: Any
) -> Any:
    """Write a folder as sae-lens-choice 0.1.0 saved it and return the SAE written.

    ``architecture`` is ``"mutual_choice"`` / ``"feature_choice"`` in ``cfg.json``;
    the SAE is :func:`make_legacy_sae` (``kwargs``), its thresholds calibrated
    exactly on ``calibrate_on`` when given, saved with SAELens's ``save_model``.
    """
    from sae_lens_choice import calibrate_thresholds

    sae = make_legacy_sae(arch, **kwargs)
    if calibrate_on is not None:
        calibrate_thresholds(sae, calibrate_on, show_progress=False)
    sae.save_model(path)
    return sae


def run_python(code: str, *args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run ``code`` in a fresh interpreter (``python -c code args...``); fail on a non-zero exit.

    ``env`` defaults to this process's environment without ``PYTHONPATH``, and
    ``cwd`` should be a temporary folder, so the child imports only what it
    asks for (a test that this package is not needed can then assert
    ``"sae_lens_choice" not in sys.modules`` in the child).
    """
    import os
    import subprocess
    import sys

    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def make_calibrated_legacy_sae(
    arch: str, *, n_tokens: int = 2048, data_seed: int = 1, **kwargs: Any
) -> Any:
    """:func:`make_legacy_sae` (``kwargs``), thresholds calibrated exactly on
    ``sparse_activations(n_tokens, data_seed)``: it fires about k latents a token."""
    from sae_lens_choice import calibrate_thresholds

    sae = make_legacy_sae(arch, **kwargs)
    x = sparse_activations(n_tokens, seed=data_seed, d_in=sae.cfg.d_in)
    return calibrate_thresholds(sae, x, show_progress=False)


#: ``sae-lens-choice demo`` at a tiny scale (seconds): :class:`DemoConfig` fields.
TINY_DEMO: dict[str, Any] = {
    "d_in": 8,
    "n_features": 32,
    "d_sae": 32,
    "k": 2.0,
    "training_samples": 4096,
    "batch_size": 256,
    "calibration_samples": 1024,
    "eval_samples": 1024,
}


def checkpoint_dirs(root: Path) -> list[Path]:
    """SAELens's checkpoint folders under ``root``, by training samples.

    SAELens writes ``<checkpoint_path>/<run id>/<n training samples>/``; the run
    id is 8 hex digits and is all decimal digits about 2% of the time, so only
    the second level counts.
    """
    return sorted(
        (p for p in root.glob("*/*") if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )
