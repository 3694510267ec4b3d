"""Train a Mutual Choice SAE on GPT-2 small's residual stream with SAELens.

A standard SAELens ``LanguageModelSAERunnerConfig``; the only plugin-specific
part is the ``sae=MutualChoiceTrainingSAEConfig(...)`` field (and the
``import sae_lens_choice`` that registers it). Sized for one GPU (a 24 GB card
is plenty): GPT-2 small, ``blocks.8.hook_resid_pre`` (d_in = 768), 16x
expansion (d_sae = 12288), expected L0 k = 32, 200M tokens of OpenWebText,
pre-tokenized for GPT-2. Metrics (per-token L0 spread, dead and under-used
latents, the Zipf fit of latent densities, the inference threshold) go to
Weights & Biases.

    pip install sae-lens-choice
    wandb login                        # or set log_to_wandb=False below
    python examples/train_gpt2_mutual_choice.py

The trained SAE is written to ``output/<run id>`` in SAELens's format as a
per-token inference SAE (a JumpReLU on a global threshold). Before relying on
its threshold, recalibrate it on held-out activations::

    import sae_lens_choice
    from sae_lens import SAE
    sae = SAE.load_from_disk("output/<run id>")
    sae_lens_choice.calibrate_thresholds(sae, activation_batches)

The same run from the shell: ``examples/train_feature_choice_cli.sh`` (there
with Feature Choice).
"""

from __future__ import annotations

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

from sae_lens_choice import MutualChoiceTrainingSAEConfig

TRAINING_TOKENS = 200_000_000
BATCH_SIZE_TOKENS = 4096


def build_config(
    device: str | None = None,
) -> LanguageModelSAERunnerConfig[MutualChoiceTrainingSAEConfig]:
    """The runner config; building it downloads nothing (the runner does, when run)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    total_steps = TRAINING_TOKENS // BATCH_SIZE_TOKENS
    return LanguageModelSAERunnerConfig(
        sae=MutualChoiceTrainingSAEConfig(
            d_in=768,
            d_sae=16 * 768,
            k=32,  # expected L0: the batch keeps its 32 * N largest pre-activations
            aux_loss="aux_zipf",  # dead *and* under-used latents reconstruct the residual
            aux_loss_coefficient=1.0,
            zipf_underuse_ratio=0.5,  # under-used: density < 0.5 x the fitted Zipf curve
            normalize_activations="expected_average_only_in",
            dtype="float32",
        ),
        # data: GPT-2 small, residual stream before block 8
        model_name="gpt2",
        hook_name="blocks.8.hook_resid_pre",
        dataset_path="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
        is_dataset_tokenized=True,
        streaming=True,
        context_size=128,
        exclude_special_tokens=True,  # keep BOS's outsized activations out of training
        # training
        training_tokens=TRAINING_TOKENS,
        train_batch_size_tokens=BATCH_SIZE_TOKENS,
        lr=3e-4,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=total_steps // 5,  # linear decay over the last 20%
        adam_beta1=0.9,
        adam_beta2=0.999,
        dead_feature_window=1000,
        feature_sampling_window=2000,
        n_batches_in_buffer=64,
        store_batch_size_prompts=16,
        autocast=device.startswith("cuda"),  # bf16 SAE forward on GPU
        autocast_lm=device.startswith("cuda"),
        # logging and outputs
        logger=LoggingConfig(
            log_to_wandb=True,
            wandb_project="sae-lens-choice",
            run_name="gpt2-L8-resid-mutual-choice-16x-k32",
            wandb_log_frequency=30,
            eval_every_n_wandb_logs=20,
        ),
        n_checkpoints=4,
        checkpoint_path="checkpoints",
        output_path="output",
        device=device,
        seed=42,
    )


if __name__ == "__main__":
    LanguageModelSAETrainingRunner(build_config()).run()
