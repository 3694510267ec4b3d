"""End-to-end tests of ``sae-lens-choice demo`` and ``zipf-fit`` at a tiny scale."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_DEMO
from sae_lens import SAE, JumpReLUSAE, TopKSAE

from sae_lens_choice.demo import (
    ARCHITECTURE_TABLE,
    ARCHITECTURES,
    DemoConfig,
    DemoError,
    demo_main,
    load_sparsity,
    run_demo,
    zipf_fit_main,
)
from sae_lens_choice.demo.architectures import training_config
from sae_lens_choice.demo.data import EVAL, SyntheticData
from sae_lens_choice.evaluation import evaluate_sae

THRESHOLDED = ["batchtopk", "mutual_choice", "feature_choice_uniform", "feature_choice_zipf"]
# Every row the demo reports, in table order: the SAE as saved, then recalibrated.
MODEL_NAMES = ["topk"] + [n for a in THRESHOLDED for n in (a, f"{a}_recalibrated")]
TINY = [f"--{name.replace('_', '-')}={value:g}" for name, value in TINY_DEMO.items()]
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
    for column in ("NMSE", "MCC", "dead", "under-used", "samples/s"):
        assert column in stdout
    assert "SAE.load_from_disk(" in stdout

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
        assert 0 <= m["dead_latents"] <= m["underused_latents"] <= 32
        assert m["n_tokens"] == 1024
        assert m["train_samples"] == 4096
        assert m["train_samples_per_second"] > 0
        assert Path(m["path"]).is_dir()
    by_name = {m["name"]: m for m in models}
    # TopK is per token: exactly k latents or fewer (only positive values fire).
    assert by_name["topk"]["l0_std"] <= 0.5 and by_name["topk"]["l0_max"] <= 2
    # Saved (exact on the last training tokens) and recalibrated thresholds hit
    # k = 2 on their own tokens; the eval split is another sample.
    for name in MODEL_NAMES[1:]:
        if name != "batchtopk":  # SAELens's EMA threshold: no promise
            assert 1.0 < by_name[name]["l0_mean"] < 3.0, name
    for name in THRESHOLDED:
        assert by_name[name]["thresholds"] == "saved"
        assert by_name[f"{name}_recalibrated"]["thresholds"] == "recalibrated"
        assert by_name[name]["sae_architecture"] == "jumprelu"
    # k sweep: every architecture at k = 2 (main), 1 and 3
    assert sorted({m["k"] for m in results["sweep"] if m["name"] == "mutual_choice"}) == [
        1.0,
        2.0,
        3.0,
    ]
    assert results["data"]["true_l0_eval"] > 0
    # what the run shows, computed from the table, and the scale it holds at
    best = min(models, key=lambda m: m["nmse"])
    assert f"- Lowest NMSE: {best['name']} ({best['nmse']:.4f})." in markdown
    assert f"Lowest NMSE: {best['name']}" in stdout
    closest = max(models, key=lambda m: m["mcc"])
    assert f"(highest MCC): {closest['name']} ({closest['mcc']:.3f})" in markdown
    no_dead = [m["name"] for m in models if m["dead_latents"] == 0]
    assert ("No dead latents: " + (", ".join(no_dead) or "none of them") + ".") in markdown
    assert "not which architecture to choose" in markdown
    # which model wins what: the sentence follows the table
    if best["name"] != "topk":
        assert f"A Choice SAE reconstructs best here: {best['name']}." in markdown
    elif closest["name"] != "topk":
        assert f"TopK reconstructs best while {closest['name']} recovers" in markdown
    else:
        assert "TopK both reconstructs best and recovers the true features best" in markdown


@pytest.mark.parametrize(
    ("nmse_winner", "mcc_winner", "expected"),
    [
        ("topk", "feature_choice_zipf", "TopK reconstructs best while feature_choice_zipf"),
        ("topk", "topk", "TopK both reconstructs best"),
        ("mutual_choice", "topk", "A Choice SAE reconstructs best here: mutual_choice."),
    ],
)
def test_trade_off_sentence_names_the_winners(
    demo_run: tuple[int, str, Path], nmse_winner: str, mcc_winner: str, expected: str
) -> None:
    from sae_lens_choice.demo.report import trade_off

    _, _, out = demo_run
    rows = {m["name"]: m for m in json.loads((out / "results.json").read_text())["models"]}

    class Row:  # the two fields trade_off reads, from the run's own rows
        def __init__(self, name: str) -> None:
            self.name, self.mcc = name, rows[name]["mcc"]

    models = {name: Row(name) for name in rows}
    sentence = trade_off(
        models["topk"],  # type: ignore[arg-type]
        models[nmse_winner],  # type: ignore[arg-type]
        models[mcc_winner],  # type: ignore[arg-type]
    )
    assert expected in sentence


def test_demo_writes_plots(demo_run: tuple[int, str, Path]) -> None:
    _, _, out = demo_run
    for name in (
        "latent_density_by_rank.png",
        "l0_per_token_histogram.png",
        "nmse_vs_l0_frontier.png",
    ):
        assert_png(out / name)


def test_demo_saves_what_it_evaluates(demo_run: tuple[int, str, Path]) -> None:
    # Each row is the folder as users load it: SAELens's own classes, and the
    # same numbers when evaluated again from disk.
    _, _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    eval_batches, _ = SyntheticData(DemoConfig(**TINY_DEMO)).split(EVAL, 1024)
    x = torch.randn(16, 8)
    for m in results["models"]:
        path = Path(m["path"])
        assert path == out / "saes" / m["name"]
        assert json.loads((path / "cfg.json").read_text())["architecture"] == m["sae_architecture"]
        sae = SAE.load_from_disk(path)
        assert type(sae) is (TopKSAE if m["name"] == "topk" else JumpReLUSAE), m["name"]
        assert sae.decode(sae.encode(x)).shape == (16, 8)
        again = evaluate_sae(sae, eval_batches)
        assert again.l0_mean == m["l0_mean"], m["name"]
        assert again.nmse == pytest.approx(m["nmse"], rel=1e-6), m["name"]
        densities = load_sparsity(path / "sparsity.safetensors")
        assert densities.shape == (32,) and bool((densities >= 0).all())
    # sweep models are saved too
    assert (out / "saes" / "k1" / "mutual_choice_recalibrated" / "cfg.json").exists()
    # recalibration changes only the thresholds: one global value for
    # BatchTopK and Mutual Choice, one per latent for Feature Choice
    for name in THRESHOLDED:
        saved = SAE.load_from_disk(out / "saes" / name)
        recalibrated = SAE.load_from_disk(out / "saes" / f"{name}_recalibrated")
        torch.testing.assert_close(saved.W_enc, recalibrated.W_enc, rtol=0, atol=0)
        threshold: torch.Tensor = recalibrated.threshold  # type: ignore[assignment]
        per_latent = name.startswith("feature_choice")
        assert (torch.unique(threshold).numel() > 1) == per_latent, name


def test_zipf_fit_on_demo_directory(
    demo_run: tuple[int, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = demo_run
    plot = tmp_path / "fit.png"
    assert zipf_fit_main([str(out), "--rank-window", "2", "20", "--output", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "mutual_choice" in text and "ranks 2–20" in text and "all ranks" in text
    values = [float(tok.split("=")[1]) for tok in text.split() if tok.startswith("alpha=")]
    assert len(values) >= 2 * len(MODEL_NAMES) and all(math.isfinite(v) for v in values)
    r2 = [float(tok.split("=")[1]) for tok in text.split() if tok.startswith("R^2=")]
    assert r2 and all(math.isfinite(v) and v <= 1 for v in r2)
    assert_png(plot)


def test_zipf_fit_on_one_file(
    demo_run: tuple[int, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, out = demo_run
    plot = tmp_path / "sub" / "one.pdf"  # parent directory is created; the suffix picks PDF
    path = out / "saes" / "feature_choice_zipf" / "sparsity.safetensors"
    assert zipf_fit_main([str(path), "--output", str(plot)]) == 0
    assert "alpha=" in capsys.readouterr().out
    assert plot.read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("output", ["a.safetensors", "plot", "fit.PNGX"])
def test_zipf_fit_unsupported_output_exit_2(
    demo_run: tuple[int, str, Path],
    output: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # refused up front, before any file is read or written
    _, _, out = demo_run
    target = tmp_path / "new_dir" / output
    assert zipf_fit_main([str(out), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and ".png" in err and "Traceback" not in err
    assert not (tmp_path / "new_dir").exists()
    assert zipf_fit_main([str(tmp_path / "missing"), "--output", output]) == 2
    assert "suffix" in capsys.readouterr().err


def test_run_demo_python_api(tmp_path: Path) -> None:
    results = run_demo(
        DemoConfig(**{**TINY_DEMO, "training_samples": 2048}),
        architectures=("mutual_choice",),
        output_dir=tmp_path,
        show_progress=False,
    )
    assert [m.name for m in results.models] == ["mutual_choice", "mutual_choice_recalibrated"]
    assert results.models[0].densities.shape == (32,)
    assert results.models[0].explained_variance == 1 - results.models[0].nmse
    assert (tmp_path / "results.json").exists()
    assert results.to_dict()["config"]["architectures"] == ["mutual_choice"]


def test_architecture_table() -> None:
    assert tuple(ARCHITECTURE_TABLE) == ARCHITECTURES
    built = {name: training_config(name, d_in=8, d_sae=32, k=2.4) for name in ARCHITECTURES}
    assert {name: cfg.architecture() for name, cfg in built.items()} == {
        "topk": "topk",
        "batchtopk": "batchtopk",
        "mutual_choice": "mutual_choice",
        "feature_choice_uniform": "feature_choice",
        "feature_choice_zipf": "feature_choice",
    }
    assert built["topk"].k == 2 and built["batchtopk"].k == 2.4  # TopK's k is a count
    assert built["mutual_choice"].aux_loss == "aux_k"  # the package default
    assert built["feature_choice_uniform"].capacity == "uniform"
    assert built["feature_choice_zipf"].capacity == "zipf"
    # a variant adds options; the table itself is unchanged
    row = ARCHITECTURE_TABLE["mutual_choice"].variant("mc_aux_k", "MC (aux_k)", aux_loss="aux_k")
    table = {**ARCHITECTURE_TABLE, row.name: row}
    assert training_config("mc_aux_k", d_in=8, d_sae=32, k=2, table=table).aux_loss == "aux_k"
    assert "mc_aux_k" not in ARCHITECTURE_TABLE
    with pytest.raises(ValueError, match="architecture"):
        training_config("mc_aux_k", d_in=8, d_sae=32, k=2)


def test_training_data_order_is_reproducible() -> None:
    cfg = DemoConfig(d_in=8, n_features=32, d_sae=32, batch_size=64)
    data = SyntheticData(cfg)
    first = next(data.train_provider())
    provider = data.train_provider()
    torch.manual_seed(123)  # other random draws must not change the data
    torch.rand(10)
    again = next(provider)
    torch.testing.assert_close(first, again)
    assert not torch.equal(next(provider), first)


def test_held_out_splits_and_seeds_draw_different_data() -> None:
    # torch keeps only the low 32 bits of a seed: 0.1.0's offsets (split << 40)
    # made the calibration and evaluation splits repeat the training batches
    from sae_lens_choice.demo.data import CALIBRATION, EVAL, TRAIN

    data = SyntheticData(DemoConfig(d_in=8, n_features=32, d_sae=32, batch_size=64))
    train, calibration, evaluation = (
        data.batch(split, 0, 64)[0] for split in (TRAIN, CALIBRATION, EVAL)
    )
    assert not torch.equal(train, calibration)
    assert not torch.equal(train, evaluation)
    assert not torch.equal(calibration, evaluation)
    other_seed = SyntheticData(DemoConfig(d_in=8, n_features=32, d_sae=32, batch_size=64, seed=1))
    # a different run seed draws other batches (and another synthetic model)
    assert not torch.equal(other_seed.batch(TRAIN, 0, 64)[0], train)
    # batches of one split differ from each other and repeat exactly when redrawn
    assert not torch.equal(data.batch(TRAIN, 1, 64)[0], train)
    torch.testing.assert_close(data.batch(TRAIN, 0, 64)[0], train, rtol=0, atol=0)


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
        (["--scale", "0"], "must be a finite number > 0"),
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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("firing_min_prob", 0.5, "firing_min_prob must be a finite number > 0 and < 0.3"),
        ("lr_decay_fraction", 1.0, "lr_decay_fraction"),
        ("seed", -1, "--seed must be an integer >= 0"),
        ("architectures", ("topk", "nope"), "--architectures must be one of"),
        ("threads", 0, "--threads"),
    ],
)
def test_run_demo_bad_settings(field: str, value: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(DemoError, match=message):
        run_demo(DemoConfig(**TINY_DEMO), output_dir=tmp_path / "o", **{field: value})
    assert not (tmp_path / "o").exists()


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
