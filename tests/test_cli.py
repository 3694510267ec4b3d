"""The ``sae-lens-choice`` command: the subcommand table and ``train``.

``train`` reuses SAELens's own training-CLI parser, so these tests compare
against it directly, check that our config fields appear in ``--help``, and
that bad flags and values exit with status 2 and a message naming them (no
traceback). One test runs a whole training through ``main``: only the model
loading is swapped for a tiny local transformer (there is no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
import sae_lens
import torch
from sae_lens import SAE, JumpReLUSAE, LanguageModelSAETrainingRunner
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_lens_choice import (
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAEConfig,
)
from sae_lens_choice.cli import (
    COMMANDS,
    Command,
    LaunchOptions,
    main,
    parse_train_args,
    split_launch_args,
    torchrun_command,
    torchrun_world_size,
)

os.environ.setdefault("WANDB_MODE", "disabled")

HOOK = "blocks.0.hook_resid_post"

# SAELens runner flags (a broad sample of them) plus our config fields.
SAELENS_FLAGS = [
    "--model_name", "tiny-random",
    "--hook_name", HOOK,
    "--dataset_path", "some/dataset",
    "--context_size", "16",
    "--training_tokens", "4096",
    "--train_batch_size_tokens", "64",
    "--store_batch_size_prompts", "8",
    "--n_batches_in_buffer", "8",
    "--lr", "0.001",
    "--lr_warm_up_steps", "3",
    "--lr_scheduler_name", "constant",
    "--dead_feature_window", "17",
    "--feature_sampling_window", "33",
    "--seed", "7",
    "--streaming", "false",
    "--prepend_bos", "false",
    "--log_to_wandb", "false",
    "--wandb_project", "choice-tests",
    "--n_checkpoints", "0",
    "--d_in", "16",
    "--d_sae", "64",
    "--normalize_activations", "none",
    "--apply_b_dec_to_input", "false",
]  # fmt: skip
OUR_SHARED_FLAGS = [
    "--k", "3.5",
    "--aux_loss", "aux_zipf",
    "--aux_loss_coefficient", "0.5",
    "--zipf_underuse_ratio", "0.25",
    "--zipf_fit_rank_window", "0.05", "0.8",
    "--zipf_refit_every", "5",
    "--density_ema_decay", "0.95",
    "--threshold_ema_rate", "0.05",
    "--check_finite_every", "7",
    "--rescale_acts_by_decoder_norm", "false",
]  # fmt: skip
SHARED_VALUES: dict[str, Any] = {
    "k": 3.5,
    "aux_loss": "aux_zipf",
    "aux_loss_coefficient": 0.5,
    "zipf_underuse_ratio": 0.25,
    "zipf_fit_rank_window": (0.05, 0.8),
    "zipf_refit_every": 5,
    "density_ema_decay": 0.95,
    "threshold_ema_rate": 0.05,
    "check_finite_every": 7,
    "rescale_acts_by_decoder_norm": False,
    "d_in": 16,
    "d_sae": 64,
    "apply_b_dec_to_input": False,
}
OUR_FIELDS = {
    "shared": [
        "--k",
        "--aux_loss",
        "--aux_loss_coefficient",
        "--zipf_underuse_ratio",
        "--zipf_fit_rank_window",
        "--zipf_refit_every",
        "--density_ema_decay",
        "--threshold_ema_rate",
        "--check_finite_every",
    ],
    "feature_choice": ["--capacity", "--zipf_alpha", "--zipf_beta"],
    "mutual_choice": ["--allocation_method"],
}


def _comparable(cfg: Any) -> dict[str, Any]:
    # the runner config appends a random run id to checkpoint_path
    d = cfg.to_dict()
    d.pop("checkpoint_path")
    return d


# ---------------------------------------------------------------------------
# top level
# ---------------------------------------------------------------------------


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sae-lens-choice" in out
    for name in COMMANDS:
        assert name in out


def test_no_arguments_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err
    assert "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from sae_lens_choice import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_command_table_entries_resolve_lazily(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # every registered command resolves to a callable
    for command in COMMANDS.values():
        assert callable(command.load())
    # adding a command is one table entry pointing at "module:function"
    monkeypatch.setitem(COMMANDS, "echo-test", Command(help="test", target=f"{__name__}:_echo"))
    assert main(["echo-test", "a", "--b"]) == 3
    assert capsys.readouterr().out == "['a', '--b']\n"


def _echo(argv: list[str]) -> int:
    print(argv)
    return 3


# ---------------------------------------------------------------------------
# train: help
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice"])
def test_train_help_lists_our_fields(arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_train_args(["--architecture", arch, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-lens-choice train")
    for flag in OUR_FIELDS["shared"] + OUR_FIELDS[arch]:
        assert flag in out, flag
    # SAELens's own flags are there too
    for flag in ("--model_name", "--hook_name", "--training_tokens", "--d_sae"):
        assert flag in out
    # and through main, which returns the code instead of exiting
    assert main(["train", "--architecture", arch, "--help"]) == 0
    assert "--zipf_underuse_ratio" in capsys.readouterr().out


def test_train_without_arguments_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 0
    assert "--architecture" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# train: parsing
# ---------------------------------------------------------------------------


# each architecture's own flags and the config values they give
OWN_FLAGS: dict[str, tuple[type[Any], list[str], dict[str, Any]]] = {
    "feature_choice": (
        FeatureChoiceTrainingSAEConfig,
        ["--capacity", "uniform", "--zipf_alpha", "1.5", "--zipf_beta", "2"],
        {"capacity": "uniform", "zipf_alpha": 1.5, "zipf_beta": 2.0},
    ),
    "mutual_choice": (
        MutualChoiceTrainingSAEConfig,
        ["--allocation_method", "flat"],
        {"allocation_method": "flat"},
    ),
}


@pytest.mark.parametrize("arch", list(OWN_FLAGS))
def test_parse_full_argument_list(arch: str) -> None:
    config_class, own_flags, own_values = OWN_FLAGS[arch]
    cfg = parse_train_args(["--architecture", arch, *SAELENS_FLAGS, *OUR_SHARED_FLAGS, *own_flags])
    assert type(cfg.sae) is config_class
    for name, value in {**SHARED_VALUES, **own_values}.items():
        assert getattr(cfg.sae, name) == value, name
    assert isinstance(cfg.sae.zipf_fit_rank_window, tuple)
    assert cfg.model_name == "tiny-random"
    assert cfg.hook_name == HOOK
    assert cfg.training_tokens == 4096
    assert cfg.lr == 0.001
    assert cfg.dead_feature_window == 17
    assert cfg.seed == 7
    assert cfg.streaming is False
    assert cfg.logger.log_to_wandb is False
    assert cfg.logger.wandb_project == "choice-tests"


@pytest.mark.parametrize("arch", ["feature_choice", "mutual_choice", "topk"])
def test_parse_matches_sae_lens_own_parser(arch: str) -> None:
    # the same parser: every SAELens flag, and SAELens's own architectures too
    args = ["--architecture", arch, *SAELENS_FLAGS, "--k", "4"]
    ours = parse_train_args(args)
    theirs = _parse_cfg_args(args)
    assert type(ours.sae) is type(theirs.sae)
    assert _comparable(ours) == _comparable(theirs)
    if arch == "topk":
        assert type(ours.sae) is TopKTrainingSAEConfig


def test_architecture_defaults_to_mutual_choice() -> None:
    cfg = parse_train_args(["--d_in", "16", "--d_sae", "64", "--k", "4"])
    assert type(cfg.sae) is MutualChoiceTrainingSAEConfig


@pytest.mark.parametrize(
    "spelling",
    [
        ["--architecture", "feature_choice"],
        ["--architecture=feature_choice"],
        ["--sae", "feature_choice"],
        ["--arch", "feature_choice"],
    ],
)
def test_architecture_flag_spellings(spelling: list[str]) -> None:
    cfg = parse_train_args([*spelling, "--capacity", "uniform"])
    assert type(cfg.sae) is FeatureChoiceTrainingSAEConfig
    assert cfg.sae.capacity == "uniform"


# ---------------------------------------------------------------------------
# train: errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--architecture", "feature_choice", "--capacity", "bogus"], ["--capacity", "bogus"]),
        (["--architecture", "feature_choice", "--k", "-1"], ["k must be a finite number > 0"]),
        (["--architecture", "mutual_choice", "--k", "abc"], ["--k", "abc"]),
        (["--architecture", "mutual_choice", "--k", "5000", "--d_sae", "64"], ["k", "d_sae"]),
        (["--architecture", "mutual_choice", "--aux_loss", "aux_q"], ["--aux_loss", "aux_q"]),
        (
            ["--architecture", "mutual_choice", "--zipf_fit_rank_window", "0.9", "0.1"],
            ["zipf_fit_rank_window"],
        ),
        (
            ["--architecture", "mutual_choice", "--zipf_underuse_ratio", "2"],
            ["zipf_underuse_ratio"],
        ),
        (["--architecture", "feature_choice", "--zipf_alpha", "0"], ["zipf_alpha"]),
        (["--architecture", "mutual_choice", "--allocation_method", "x"], ["--allocation_method"]),
        (["--architecture", "mutual_choice", "--bogus_flag", "1"], ["--bogus_flag"]),
        (["--architecture", "nonexistent"], ["nonexistent"]),
        (["--architecture", "mutual_choice", "--training_tokens", "many"], ["--training_tokens"]),
    ],
)
def test_bad_train_arguments_exit_2_naming_the_field(
    args: list[str], names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_train_args(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "sae-lens-choice train" in err
    for name in names:
        assert name in err, (name, err)
    assert "Traceback" not in err

    assert main(["train", *args]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_module_entry_point_exits_2_on_bad_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sae_lens_choice", "train", "--architecture", "feature_choice",
         "--capacity", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "disabled"},
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode == 2
    assert "argument --capacity: invalid choice: 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# train: a real run through main
# ---------------------------------------------------------------------------


def test_train_command_runs_the_sae_lens_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No network: the runner would load `model_name` from the Hub. A subclass
    # supplies a tiny random transformer and a local token dataset instead;
    # everything else is SAELens's real runner.
    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=64,
            act_fn="relu",
        )
    )  # fmt: skip
    tokens = torch.randint(1, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    seen: dict[str, Any] = {}

    class OfflineRunner(LanguageModelSAETrainingRunner):
        def __init__(self, cfg: Any, **kwargs: Any) -> None:
            seen["cfg"] = cfg
            super().__init__(cfg, override_model=model, override_dataset=dataset, **kwargs)

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", OfflineRunner)
    output = tmp_path / "out"
    args = [
        "train",
        "--architecture", "feature_choice",
        *SAELENS_FLAGS,
        "--training_tokens", "640",
        "--k", "4",
        "--capacity", "zipf",
        "--checkpoint_path", str(tmp_path / "ckpt"),
        "--output_path", str(output),
    ]  # fmt: skip
    assert main(args) == 0
    assert type(seen["cfg"].sae) is FeatureChoiceTrainingSAEConfig
    loaded = SAE.load_from_disk(output)
    assert type(loaded) is JumpReLUSAE  # saved as SAELens's own architecture
    assert loaded.cfg.metadata.training_architecture == "feature_choice"
    details = loaded.cfg.metadata.training_architecture_details or {}
    assert (details["k"], details["capacity"]) == (4, "zipf")


# ---------------------------------------------------------------------------
# train: data-parallel launch options (--nproc-per-node, --dist-timeout)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "nproc", "timeout"),
    [
        (["--nproc-per-node", "4"], 4, None),
        (["--nproc_per_node=2", "--dist-timeout", "90"], 2, 90.0),
        (["--dist_timeout=1.5"], None, 1.5),
        ([], None, None),
    ],
)
def test_split_launch_args(args: list[str], nproc: int | None, timeout: float | None) -> None:
    rest = ["--architecture", "mutual_choice", "--k", "4"]
    options, remaining = split_launch_args([rest[0], *args, *rest[1:]])
    assert options == LaunchOptions(nproc_per_node=nproc, dist_timeout_s=timeout)
    assert remaining == rest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc-per-node", "0"], "argument --nproc-per-node: expected a positive integer"),
        (["--nproc-per-node=two"], "argument --nproc-per-node: expected a positive integer"),
        (["--dist-timeout", "-3"], "argument --dist-timeout: expected a positive number"),
        (["--dist-timeout"], "argument --dist-timeout: expected one value"),
    ],
)
def test_bad_launch_options_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--architecture", "mutual_choice", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_launch_checks_the_arguments_before_starting_workers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # were the arguments not parsed first, this would re-execute pytest as torchrun
    args = ["train", "--nproc-per-node", "2", "--architecture", "feature_choice"]
    assert main([*args, "--capacity", "bogus"]) == 2
    assert "argument --capacity: invalid choice: 'bogus'" in capsys.readouterr().err
    # --help shows SAELens's flags and then the launch options
    assert main([*args, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--zipf_alpha" in out and "--nproc-per-node N" in out and "--dist-timeout" in out


def test_torchrun_command_reruns_train_with_the_same_arguments() -> None:
    assert torchrun_command(3, ["--k", "4", "--device", "cuda"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
        "-m", "sae_lens_choice", "train", "--k", "4", "--device", "cuda",
    ]  # fmt: skip


def test_nproc_per_node_under_torchrun_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert torchrun_world_size() == 2
    assert main(["train", "--nproc-per-node", "2", "--architecture", "mutual_choice"]) == 2
    assert "already runs under torchrun (WORLD_SIZE=2)" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    assert torchrun_world_size() is None
