"""Training through SAELens's own runners, end to end, on CPU and offline.

- ``LanguageModelSAETrainingRunner`` with a tiny random ``HookedTransformer``
  and a local token dataset: the run saves, and ``SAE.load_from_disk`` gives
  our inference class with the trained weights (decoder norms folded) and
  thresholds.
- Checkpoints: SAELens's trainer saves the SAE's full state dict
  (``save_model``) and the runner's ``resume_from_checkpoint`` path reloads it
  (``load_weights_from_checkpoint``); our EMA buffers must survive bit for bit.
- ``LanguageModelSAERunnerConfig.from_dict`` builds our configs.
- ``SyntheticSAERunner`` on Zipfian synthetic data in superposition: Feature
  Choice ends with no dead latents; Mutual Choice with aux_zipf ends with fewer
  dead plus under-used latents than without an auxiliary loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.synthetic_model import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.synthetic_sae_runner import SyntheticSAERunner, SyntheticSAERunnerConfig
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_choice import (
    FeatureChoiceSAE,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceSAE,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)
from sae_lens_choice.zipf import fit_zipf, underused_mask

os.environ.setdefault("WANDB_MODE", "disabled")

D_MODEL = 16
D_SAE = 64
CONTEXT = 16
HOOK = "blocks.0.hook_resid_post"
BUFFERS = ("latent_density_ema", "threshold", "threshold_updates", "zipf_fit")
ARCHS = ("mutual_choice", "feature_choice")
INFERENCE_CLASSES: dict[str, type[Any]] = {
    "mutual_choice": MutualChoiceSAE,
    "feature_choice": FeatureChoiceSAE,
}


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_ctx=CONTEXT,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=64,
        act_fn="relu",
    )
    return HookedTransformer(cfg)  # random weights, no tokenizer, no download


@pytest.fixture(scope="module")
def token_dataset() -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (64, CONTEXT), generator=g)
    return datasets.Dataset.from_dict({"input_ids": tokens.tolist()})


def sae_config(arch: str, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {"d_in": D_MODEL, "d_sae": D_SAE, "k": 4, "zipf_refit_every": 1}
    kwargs.update(overrides)
    if arch == "feature_choice":
        kwargs.setdefault("aux_loss", "aux_zipf")  # exercise the aux path for both
        return FeatureChoiceTrainingSAEConfig(**kwargs)
    return MutualChoiceTrainingSAEConfig(**kwargs)


def runner_config(
    sae_cfg: Any, tmp_path: Path, **overrides: Any
) -> LanguageModelSAERunnerConfig[Any]:
    kwargs: dict[str, Any] = {
        "sae": sae_cfg,
        "model_name": "tiny-random",
        "hook_name": HOOK,
        "dataset_path": "local-token-ids",
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
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
        "checkpoint_path": str(tmp_path / "checkpoints"),
        "output_path": str(tmp_path / "output"),
        "logger": LoggingConfig(log_to_wandb=False),
        "seed": 0,
    }
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)


# ---------------------------------------------------------------------------
# LanguageModelSAETrainingRunner end to end
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_language_model_runner_trains_saves_and_loads(
    arch: str, tmp_path: Path, tiny_model: HookedTransformer, token_dataset: datasets.Dataset
) -> None:
    cfg = runner_config(sae_config(arch), tmp_path)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model, override_dataset=token_dataset
    )
    sae = runner.run()
    assert type(sae) is (
        MutualChoiceTrainingSAE if arch == "mutual_choice" else FeatureChoiceTrainingSAE
    )
    assert int(sae.threshold_updates.max()) > 0  # the EMA was fed during training

    output = tmp_path / "output"
    assert (output / RUNNER_CFG_FILENAME).exists()
    assert (output / SPARSITY_FILENAME).exists()

    loaded = SAE.load_from_disk(output)
    assert type(loaded) is INFERENCE_CLASSES[arch]
    assert loaded.cfg.architecture() == arch
    assert loaded.cfg.k == 4
    assert loaded.cfg.metadata.hook_name == HOOK

    # TopK's saving folds the decoder norms into the encoder (hidden_pre, and so
    # the thresholds in its units, are unchanged by the fold)
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1).clamp(min=1e-8)
        torch.testing.assert_close(loaded.W_enc, sae.W_enc * norms)
        torch.testing.assert_close(loaded.b_enc, sae.b_enc * norms)
        torch.testing.assert_close(loaded.W_dec, sae.W_dec / norms[:, None])
        torch.testing.assert_close(loaded.b_dec, sae.b_dec)
        expected_threshold = sae.threshold.to(torch.float32).expand(D_SAE)
        torch.testing.assert_close(loaded.threshold, expected_threshold)

        # the saved SAE's per-token code is the trained SAE's hidden_pre, thresholded
        x = torch.randn(32, D_MODEL)
        hidden_pre = sae.compute_hidden_pre(sae.process_sae_in(x))
        expected = hidden_pre.relu() * (hidden_pre > expected_threshold)
        torch.testing.assert_close(loaded.encode(x), expected, rtol=1e-4, atol=1e-5)

    # the runner config written next to the SAE loads back into our config
    with open(output / RUNNER_CFG_FILENAME) as f:
        runner_dict = json.load(f)
    reloaded = LanguageModelSAERunnerConfig.from_dict(runner_dict)
    assert type(reloaded.sae) is type(cfg.sae)
    assert reloaded.sae.zipf_fit_rank_window == cfg.sae.zipf_fit_rank_window
    assert reloaded.sae.to_dict() == cfg.sae.to_dict() | {
        "metadata": reloaded.sae.to_dict()["metadata"]
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_config_from_dict_builds_our_training_config(arch: str) -> None:
    cfg_dict = {
        "sae": {
            "architecture": arch,
            "d_in": 32,
            "d_sae": 128,
            "k": 6.5,
            "aux_loss": "aux_zipf",
            "zipf_fit_rank_window": [0.02, 0.7],
            **({"capacity": "uniform", "zipf_alpha": 1.2} if arch == "feature_choice" else {}),
        },
        "logger": {"log_to_wandb": False},
        "model_name": "tiny-random",
        "hook_name": HOOK,
    }
    cfg = LanguageModelSAERunnerConfig.from_dict(cfg_dict)
    expected_type = (
        MutualChoiceTrainingSAEConfig if arch == "mutual_choice" else FeatureChoiceTrainingSAEConfig
    )
    assert type(cfg.sae) is expected_type
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (32, 128, 6.5)
    assert cfg.sae.zipf_fit_rank_window == (0.02, 0.7)
    if arch == "feature_choice":
        assert (cfg.sae.capacity, cfg.sae.zipf_alpha) == ("uniform", 1.2)

    # to_dict -> JSON -> from_dict round trip of the whole runner config
    again = LanguageModelSAERunnerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert type(again.sae) is expected_type
    assert again.sae.to_dict() == cfg.sae.to_dict()
    assert again.sae.zipf_fit_rank_window == (0.02, 0.7)


def test_runner_config_from_dict_rejects_invalid_field() -> None:
    cfg_dict = {
        "sae": {
            "architecture": "feature_choice",
            "d_in": 32,
            "d_sae": 128,
            "k": 4,
            "capacity": "x",
        },
        "logger": {"log_to_wandb": False},
    }
    with pytest.raises(ValueError, match="capacity"):
        LanguageModelSAERunnerConfig.from_dict(cfg_dict)


# ---------------------------------------------------------------------------
# checkpoints and resume
# ---------------------------------------------------------------------------


class _SnapshotRunner(LanguageModelSAETrainingRunner):
    """Records the SAE's buffers whenever the trainer writes a checkpoint.

    The trainer calls ``save_checkpoint`` right after it saved the SAE, so the
    snapshot is the state the checkpoint should hold.
    """

    snapshots: dict[str, dict[str, torch.Tensor]]

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        super().save_checkpoint(checkpoint_path)
        if checkpoint_path is not None:
            if not hasattr(self, "snapshots"):
                self.snapshots = {}
            self.snapshots[checkpoint_path.name] = {
                name: getattr(self.sae, name).detach().clone() for name in BUFFERS
            }


def _assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    # bit for bit, NaN included
    assert torch.equal(actual.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_and_resume_restore_ema_buffers_bit_for_bit(
    arch: str, tmp_path: Path, tiny_model: HookedTransformer, token_dataset: datasets.Dataset
) -> None:
    total = 64 * 24
    cfg = runner_config(sae_config(arch), tmp_path, n_checkpoints=1, training_tokens=total)
    first = _SnapshotRunner(cfg, override_model=tiny_model, override_dataset=token_dataset)
    first.run()
    # one checkpoint, about half way (the directory is named by the sample count)
    ((name, snapshot),) = first.snapshots.items()
    checkpoint = Path(first.cfg.checkpoint_path) / name
    assert 0 < int(name) < total
    assert torch.isfinite(snapshot["zipf_fit"]).all()  # refit every step: a real fit
    assert int(snapshot["threshold_updates"].max()) > 0

    # 1. the checkpoint file holds the buffers exactly
    saved = load_file(checkpoint / SAE_WEIGHTS_FILENAME)
    for buffer in BUFFERS:
        _assert_bitwise_equal(saved[buffer], snapshot[buffer], buffer)

    # 2. SAELens's resume path restores them: resume with the checkpoint's own
    #    sample count as the budget, so no further step runs after loading
    resume_cfg = runner_config(
        sae_config(arch),
        tmp_path,
        training_tokens=int(name),
        resume_from_checkpoint=str(checkpoint),
        output_path=str(tmp_path / "resumed"),
    )
    resumed = LanguageModelSAETrainingRunner(
        resume_cfg, override_model=tiny_model, override_dataset=token_dataset
    )
    resumed.run()
    for buffer in BUFFERS:
        _assert_bitwise_equal(getattr(resumed.sae, buffer), snapshot[buffer], buffer)

    # 3. resuming with budget left continues from the restored state
    continue_cfg = runner_config(
        sae_config(arch),
        tmp_path,
        training_tokens=total,
        resume_from_checkpoint=str(checkpoint),
        output_path=str(tmp_path / "continued"),
    )
    continued = LanguageModelSAETrainingRunner(
        continue_cfg, override_model=tiny_model, override_dataset=token_dataset
    )
    continued.run()
    steps_left = (total - int(name)) // 64
    assert (
        int(continued.sae.threshold_updates.max())
        <= int(snapshot["threshold_updates"].max()) + steps_left
    )
    assert torch.all(continued.sae.threshold_updates >= snapshot["threshold_updates"])
    assert int(continued.sae.threshold_updates.max()) > int(snapshot["threshold_updates"].max())


# ---------------------------------------------------------------------------
# SyntheticSAERunner: dead and under-used latents
# ---------------------------------------------------------------------------

N_FEATURES = 256  # true features ...
HIDDEN = 32  # ... in superposition in 32 dimensions
SYN_D_SAE = 128
SYN_K = 4
SYN_STEPS = 200
SYN_BATCH = 1024
EVAL_SAMPLES = 4096


@pytest.fixture(scope="module")
def synthetic_model() -> SyntheticModel:
    cfg = SyntheticModelConfig(
        num_features=N_FEATURES,
        hidden_dim=HIDDEN,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=1.0, max_prob=0.3, min_prob=0.005
        ),
        seed=0,
    )
    return SyntheticModel(cfg)


@pytest.fixture(scope="module")
def synthetic_eval_batch(synthetic_model: SyntheticModel) -> torch.Tensor:
    torch.manual_seed(12345)  # held out: drawn apart from the training stream
    with torch.no_grad():
        features = synthetic_model.activation_generator.sample(EVAL_SAMPLES)
        return synthetic_model.feature_dict(features).detach()


def _train_synthetic(
    sae_cfg: Any, synthetic_model: SyntheticModel, output: Path
) -> tuple[Any, torch.Tensor]:
    torch.manual_seed(0)  # same init and data stream for every architecture
    cfg = SyntheticSAERunnerConfig(
        synthetic_model=synthetic_model.cfg,
        sae=sae_cfg,
        training_samples=SYN_STEPS * SYN_BATCH,
        batch_size=SYN_BATCH,
        lr=3e-3,
        dead_feature_window=50,
        feature_sampling_window=100,
        eval_samples=0,
        run_final_eval=False,
        checkpoint_path=None,
        output_path=str(output),
        logger=LoggingConfig(log_to_wandb=False),
    )
    result = SyntheticSAERunner(cfg, override_synthetic_model=synthetic_model).run()
    # SAELens's trainer writes log10 firing frequencies over its last sparsity
    # window; a latent that never fired there sits at log10(1e-10) = -10.
    log_sparsity = load_file(output / SPARSITY_FILENAME)["sparsity"]
    return result.sae, log_sparsity


def _latent_census(sae: Any, x: torch.Tensor, log_sparsity: torch.Tensor) -> dict[str, Any]:
    """Dead and under-used latents of a trained SAE on held-out data.

    dead: never fired on the held-out batch (training allocation over the
    batch, i.e. ``sae.encode``). under-used: below half of the Zipf-Mandelbrot
    curve fitted to the held-out densities (the aux_zipf criterion, gamma=0.5).
    """
    with torch.no_grad():
        acts = sae.encode(x)
    density = (acts > 0).float().mean(0)
    d_sae = density.numel()
    lo, hi = sae.cfg.zipf_fit_rank_window
    fit = fit_zipf(density, (max(1, int(lo * d_sae) + 1), int(hi * d_sae)))
    dead = density == 0
    under = underused_mask(density, fit, 0.5) & ~dead
    l0 = (acts > 0).sum(-1).float()
    return {
        "dead": int(dead.sum()),
        "underused": int(under.sum()),
        "dead_plus_underused": int((dead | under).sum()),
        "trainer_dead": int((log_sparsity <= -9.99).sum()),
        "l0": (float(l0.mean()), float(l0.std()), int(l0.min()), int(l0.max())),
        "mse": float((sae.decode(acts) - x).pow(2).sum(-1).mean()),
    }


def _report(name: str, census: dict[str, Any]) -> None:
    mean, std, lo, hi = census["l0"]
    print(
        f"\n{name}: dead={census['dead']} under-used={census['underused']} "
        f"dead+under-used={census['dead_plus_underused']} "
        f"(trainer's last-window dead={census['trainer_dead']}) of {SYN_D_SAE}; "
        f"per-token L0 mean={mean:.2f} std={std:.2f} min={lo} max={hi}; mse={census['mse']:.4f}"
    )


@pytest.fixture(scope="module")
def synthetic_threads():
    # The runs are tiny: one thread avoids oversubscribing a busy 2-core box.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_synthetic_feature_choice_has_no_dead_latents(
    synthetic_model: SyntheticModel,
    synthetic_eval_batch: torch.Tensor,
    tmp_path: Path,
    synthetic_threads: None,
) -> None:
    cfg = FeatureChoiceTrainingSAEConfig(d_in=HIDDEN, d_sae=SYN_D_SAE, k=SYN_K)
    sae, log_sparsity = _train_synthetic(cfg, synthetic_model, tmp_path / "fc")
    census = _latent_census(sae, synthetic_eval_batch, log_sparsity)
    _report("feature_choice (zipf capacities, no aux)", census)
    assert census["dead"] == 0
    assert census["trainer_dead"] == 0
    assert census["l0"][1] > 0  # per-token L0 varies
    # the saved inference SAE loads as ours
    assert type(SAE.load_from_disk(tmp_path / "fc")) is FeatureChoiceSAE


def test_synthetic_mutual_choice_aux_zipf_leaves_fewer_dead_and_underused(
    synthetic_model: SyntheticModel,
    synthetic_eval_batch: torch.Tensor,
    tmp_path: Path,
    synthetic_threads: None,
) -> None:
    common: dict[str, Any] = {"d_in": HIDDEN, "d_sae": SYN_D_SAE, "k": SYN_K}
    none_sae, none_sparsity = _train_synthetic(
        MutualChoiceTrainingSAEConfig(**common, aux_loss="none"), synthetic_model, tmp_path / "none"
    )
    # defaults: coefficient 1, gamma (zipf_underuse_ratio) 0.5; the density EMA
    # horizon is shortened to ~10 steps to suit a 200-step run
    zipf_sae, zipf_sparsity = _train_synthetic(
        MutualChoiceTrainingSAEConfig(**common, aux_loss="aux_zipf", density_ema_decay=0.9),
        synthetic_model,
        tmp_path / "aux_zipf",
    )
    none = _latent_census(none_sae, synthetic_eval_batch, none_sparsity)
    zipf = _latent_census(zipf_sae, synthetic_eval_batch, zipf_sparsity)
    _report("mutual_choice aux_loss=none", none)
    _report("mutual_choice aux_loss=aux_zipf", zipf)
    assert none["dead"] > 0  # the setting does produce dead latents without aux
    assert zipf["dead_plus_underused"] < none["dead_plus_underused"]
    assert zipf["dead"] < none["dead"]
    assert zipf["trainer_dead"] <= none["trainer_dead"]
