"""End-to-end tests of ``sae-lens-choice demo`` and ``zipf-fit`` at a tiny scale."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE, TopKSAE

import sae_lens_choice
from sae_lens_choice.demo import (
    DemoConfig,
    _SyntheticData,
    demo_main,
    load_sparsity,
    run_demo,
    zipf_fit_main,
)

# Every model name the demo reports, in table order.
MODEL_NAMES = [
    "topk",
    "batchtopk",
    "batchtopk_ema",
    "mutual_choice",
    "feature_choice_uniform",
    "feature_choice_zipf",
]
TINY = [
    "--d-in", "8",
    "--n-features", "32",
    "--d-sae", "32",
    "--k", "2",
    "--training-samples", "4096",
    "--batch-size", "256",
    "--calibration-samples", "1024",
    "--eval-samples", "1024",
]  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    # an empty matplotlib canvas is ~2 kB; curves, labels and legends add much more
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = demo_main([*TINY, "--sweep-k", "1", "3", "--output-dir", str(out)])
    return rc, stdout.getvalue(), out


def test_demo_prints_table_and_writes_results(demo_run: tuple[int, str, Path]) -> None:
    rc, stdout, out = demo_run
    assert rc == 0
    for name in MODEL_NAMES:
        assert name in stdout
    for column in ("NMSE", "MCC", "dead", "samples/s"):
        assert column in stdout
    assert "SAE.load_from_disk(" in stdout and "import sae_lens_choice" in stdout

    markdown = (out / "results.md").read_text()
    assert "| model | EV | NMSE |" in markdown
    for name in MODEL_NAMES:
        assert f"| {name} |" in markdown

    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert [m["name"] for m in models] == MODEL_NAMES
    for m in models:
        for key in ("explained_variance", "nmse", "l0_mean", "l0_std", "mcc", "uniqueness"):
            assert math.isfinite(m[key]), (m["name"], key)
        assert m["nmse"] == pytest.approx(1 - m["explained_variance"])
        assert 0 <= m["mcc"] <= 1
        assert 0 <= m["dead_latents"] <= 32
        assert m["train_samples"] == 4096
        assert m["train_samples_per_second"] > 0
        assert Path(m["path"]).is_dir()
    by_name = {m["name"]: m for m in models}
    # TopK is per token: exactly k latents or fewer (only positive values fire).
    assert by_name["topk"]["l0_std"] <= 0.5 and by_name["topk"]["l0_max"] <= 2
    # Calibrated thresholds hit k on the calibration split; the eval split is
    # another sample of the same distribution.
    for name in ("mutual_choice", "batchtopk", "feature_choice_uniform", "feature_choice_zipf"):
        assert 1.0 < by_name[name]["l0_mean"] < 3.0, name
        assert by_name[name]["threshold"].startswith("calibrated")
    # k sweep: every architecture at k = 2 (main), 1 and 3
    assert sorted({m["k"] for m in results["sweep"] if m["name"] == "mutual_choice"}) == [
        1.0,
        2.0,
        3.0,
    ]
    assert results["data"]["true_l0_eval"] > 0


def test_demo_writes_plots(demo_run: tuple[int, str, Path]) -> None:
    _, _, out = demo_run
    for name in (
        "latent_density_by_rank.png",
        "l0_per_token_histogram.png",
        "nmse_vs_l0_frontier.png",
    ):
        assert_png(out / name)


def test_demo_saves_loadable_saes(demo_run: tuple[int, str, Path]) -> None:
    _, _, out = demo_run
    expected = {
        "topk": TopKSAE,
        "batchtopk": JumpReLUSAE,
        "batchtopk_ema": JumpReLUSAE,
        "mutual_choice": sae_lens_choice.MutualChoiceSAE,
        "feature_choice_uniform": sae_lens_choice.FeatureChoiceSAE,
        "feature_choice_zipf": sae_lens_choice.FeatureChoiceSAE,
    }
    x = torch.randn(16, 8)
    for name, cls in expected.items():
        path = out / "saes" / name
        sae = SAE.load_from_disk(path)
        assert type(sae) is cls, name
        assert sae.encode(x).shape == (16, 32)
        assert sae.decode(sae.encode(x)).shape == (16, 8)
        densities = load_sparsity(path / "sparsity.safetensors")
        assert densities.shape == (32,) and bool((densities >= 0).all())
    # sweep models are saved too
    assert (out / "saes" / "k1" / "mutual_choice" / "cfg.json").exists()
    # the calibrated BatchTopK differs from SAELens's export only in its threshold
    a = SAE.load_from_disk(out / "saes" / "batchtopk")
    b = SAE.load_from_disk(out / "saes" / "batchtopk_ema")
    torch.testing.assert_close(a.W_enc, b.W_enc)
    assert a.threshold.unique().numel() == 1


def test_zipf_fit_on_demo_directory(
    demo_run: tuple[int, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = demo_run
    plot = tmp_path / "fit.png"
    assert zipf_fit_main([str(out), "--rank-window", "2", "20", "--output", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "mutual_choice" in text and "ranks 2–20" in text and "all ranks" in text
    values = [float(tok.split("=")[1]) for tok in text.split() if tok.startswith("alpha=")]
    assert len(values) >= 2 * 6 and all(math.isfinite(v) for v in values)
    r2 = [float(tok.split("=")[1]) for tok in text.split() if tok.startswith("R^2=")]
    assert r2 and all(math.isfinite(v) and v <= 1 for v in r2)
    assert_png(plot)


def test_zipf_fit_on_one_file(
    demo_run: tuple[int, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = demo_run
    plot = tmp_path / "sub" / "one.png"  # parent directory is created
    path = out / "saes" / "feature_choice_zipf" / "sparsity.safetensors"
    assert zipf_fit_main([str(path), "--output", str(plot)]) == 0
    assert "alpha=" in capsys.readouterr().out
    assert_png(plot)


def test_run_demo_python_api(tmp_path: Path) -> None:
    results = run_demo(
        DemoConfig(
            d_in=8,
            n_features=32,
            d_sae=32,
            k=2,
            training_samples=2048,
            batch_size=256,
            calibration_samples=512,
            eval_samples=512,
        ),
        architectures=("mutual_choice",),
        output_dir=tmp_path,
        show_progress=False,
    )
    assert [m.name for m in results.models] == ["mutual_choice"]
    assert results.models[0].densities.shape == (32,)
    assert (tmp_path / "results.json").exists()
    assert results.to_dict()["config"]["architectures"] == ["mutual_choice"]


def test_training_data_order_is_reproducible() -> None:
    cfg = DemoConfig(d_in=8, n_features=32, d_sae=32, batch_size=64)
    data = _SyntheticData(cfg)
    first = next(data.train_provider())
    provider = data.train_provider()
    torch.manual_seed(123)  # other random draws must not change the data
    torch.rand(10)
    again = next(provider)
    torch.testing.assert_close(first, again)
    assert not torch.equal(next(provider), first)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--k", "-1"], "must be a finite number > 0"),
        (["--bogus-flag"], "unrecognized arguments"),
        (["--d-in", "zero"], "not an integer"),
        (["--k", "64", "--d-sae", "32"], "larger than --d-sae"),
        (["--training-samples", "100", "--batch-size", "256"], "no training step"),
        (["--architectures", "sparse_magic"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_demo_bad_flags_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the settings are checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_unavailable_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main([*TINY, "--device", "cuda", "--output-dir", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_unwritable_output_dir_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert demo_main([*TINY, "--output-dir", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


def test_zipf_fit_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert zipf_fit_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert zipf_fit_main([str(tmp_path)]) == 2
    assert "no sparsity.safetensors" in capsys.readouterr().err
    assert zipf_fit_main([str(tmp_path), "--rank-window", "5", "2"]) == 2
    assert "LO <= HI" in capsys.readouterr().err
    assert zipf_fit_main([]) == 2  # PATH is required


def test_load_sparsity_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    densities = torch.tensor([0.5, 0.01, 0.0, 1e-4])
    save_file({"sparsity": torch.log10(densities + 1e-10)}, tmp_path / "sparsity.safetensors")
    loaded = load_sparsity(tmp_path / "sparsity.safetensors")
    torch.testing.assert_close(loaded, densities.double(), rtol=1e-5, atol=1e-9)
    assert loaded[2] == 0
