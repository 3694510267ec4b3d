#!/usr/bin/env bash
# Train a Feature Choice SAE (Zipf capacities) on GPT-2 small's residual stream
# from the shell: the run of examples/train_gpt2_mutual_choice.py, with Feature
# Choice instead of Mutual Choice.
#
# `sae-lens-choice train` is SAELens's own training CLI
# (python -m sae_lens.llm_sae_training_runner) with this plugin's architectures
# registered, so every flag is SAELens's: LanguageModelSAERunnerConfig fields
# and, after --architecture, that architecture's training-config fields, all
# spelled with underscores. `sae-lens-choice train --architecture feature_choice
# --help` lists them. Sized for one GPU; set DEVICE=cpu for a (slow) CPU run.
#
#   wandb login
#   bash examples/train_feature_choice_cli.sh
#
# The SAE lands in output/<run id> in SAELens's format, as a per-token
# inference SAE (a JumpReLU with one threshold per latent).
set -euo pipefail

DEVICE="${DEVICE:-cuda}"

sae-lens-choice train \
    --architecture feature_choice \
    --d_in 768 \
    --d_sae 12288 \
    --k 32 \
    --capacity zipf \
    --zipf_alpha 1.0 \
    --zipf_beta 0.0 \
    --aux_loss none \
    --normalize_activations expected_average_only_in \
    --model_name gpt2 \
    --hook_name blocks.8.hook_resid_pre \
    --dataset_path apollo-research/Skylion007-openwebtext-tokenizer-gpt2 \
    --is_dataset_tokenized true \
    --streaming true \
    --context_size 128 \
    --exclude_special_tokens true \
    --training_tokens 200000000 \
    --train_batch_size_tokens 4096 \
    --lr 3e-4 \
    --lr_scheduler_name constant \
    --lr_decay_steps 9765 \
    --dead_feature_window 1000 \
    --feature_sampling_window 2000 \
    --n_batches_in_buffer 64 \
    --store_batch_size_prompts 16 \
    --log_to_wandb true \
    --wandb_project sae-lens-choice \
    --run_name gpt2-L8-resid-feature-choice-zipf-16x-k32 \
    --wandb_log_frequency 30 \
    --eval_every_n_wandb_logs 20 \
    --n_checkpoints 4 \
    --checkpoint_path checkpoints \
    --output_path output \
    --device "$DEVICE" \
    --seed 42 \
    "$@"
