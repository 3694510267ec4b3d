"""The example scripts import and build their configs; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import TINY_DEMO

import sae_lens_choice
from sae_lens_choice.demo import ARCHITECTURES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def import_example(name: str) -> ModuleType:
    path = EXAMPLES / name
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Building configs must not touch the Hub; make any attempt fail fast.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_synthetic_quickstart_runs_at_tiny_scale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = import_example("synthetic_quickstart.py")
    cfg = module.build_config()
    assert cfg.architectures == ARCHITECTURES
    results = module.main(**TINY_DEMO, output_dir=tmp_path, show_progress=False)
    names = [m.name for m in results.models]
    assert {"mutual_choice", "feature_choice_zipf", "mutual_choice_recalibrated"} <= set(names)
    out = capsys.readouterr().out
    assert "per-token L0" in out
    assert all(name in out for name in names)


def test_gpt2_mutual_choice_builds_config() -> None:
    from sae_lens import LanguageModelSAERunnerConfig

    module = import_example("train_gpt2_mutual_choice.py")
    cfg = module.build_config(device="cpu")
    assert isinstance(cfg, LanguageModelSAERunnerConfig)
    assert isinstance(cfg.sae, sae_lens_choice.MutualChoiceTrainingSAEConfig)
    assert cfg.sae.architecture() == "mutual_choice"
    assert (cfg.model_name, cfg.hook_name, cfg.sae.d_in) == ("gpt2", "blocks.8.hook_resid_pre", 768)
    assert cfg.sae.aux_loss == "aux_zipf"
    assert cfg.logger.log_to_wandb
    assert cfg.lr_decay_steps == cfg.total_training_steps // 5


def cli_script_args() -> list[str]:
    text = (EXAMPLES / "train_feature_choice_cli.sh").read_text()
    match = re.search(r"sae-lens-choice train \\\n(.*?)\"\$@\"", text, re.S)
    assert match, 'the script should call `sae-lens-choice train ... "$@"`'
    return shlex.split(match.group(1).replace("\\\n", " ").replace('"$DEVICE"', "cpu"))


def test_feature_choice_cli_script_flags_parse_with_train_parser() -> None:
    # `sae-lens-choice train` parses SAELens's training-CLI flags (SAELens's own
    # parser, with the plugin's architectures registered).
    from sae_lens_choice.cli import parse_train_args

    cfg = parse_train_args(cli_script_args())
    assert isinstance(cfg.sae, sae_lens_choice.FeatureChoiceTrainingSAEConfig)
    assert cfg.sae.capacity == "zipf"
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (768, 12288, 32)
    assert (cfg.model_name, cfg.hook_name) == ("gpt2", "blocks.8.hook_resid_pre")
    assert cfg.device == "cpu"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_feature_choice_cli_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(EXAMPLES / "train_feature_choice_cli.sh")], check=True)
