"""The demo run: train every model, save it, evaluate it as users load it, report.

Each model is trained (:mod:`~sae_lens_choice.demo.train`), saved in SAELens's
format and loaded back with ``SAE.load_from_disk``, as users get it: TopK as
SAELens's ``topk``; BatchTopK, Mutual Choice and Feature Choice as SAELens's
``jumprelu``. The loaded SAE is evaluated per token on the evaluation split
as saved (BatchTopK with SAELens's training-EMA threshold; Mutual and Feature
Choice with the thresholds calibrated on their last training tokens when
saved), then again after ``calibrate_thresholds`` on the calibration split
(saved too, as ``<name>_recalibrated``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from sae_lens_choice.calibration import calibrate_thresholds
from sae_lens_choice.demo.architectures import ARCHITECTURE_TABLE
from sae_lens_choice.demo.config import DemoConfig, DemoError, prepare_output_dir
from sae_lens_choice.demo.data import CALIBRATION, EVAL, SyntheticData
from sae_lens_choice.demo.plots import plot_densities, plot_frontier, plot_l0_histograms
from sae_lens_choice.demo.report import findings, rich_table, write_json
from sae_lens_choice.demo.results import RECALIBRATED, SAVED, DemoResults, ModelResult
from sae_lens_choice.demo.saved import save_sae
from sae_lens_choice.demo.train import TrainedModel, model_config, quiet_progress, train_model
from sae_lens_choice.evaluation import evaluate_sae

__all__ = ["run_demo"]


def run_demo(config: DemoConfig | None = None, **overrides: Any) -> DemoResults:
    """Train, save, load, evaluate and recalibrate the demo's SAEs; write tables and plots.

    Args:
        config: the settings (default :class:`DemoConfig`).
        **overrides: fields of :class:`DemoConfig` replacing those of ``config``
            (``run_demo(k=8, output_dir="out")``).

    Returns:
        :class:`DemoResults` (per-model metrics, paths of every file written).

    Raises:
        DemoError: a bad setting or an unwritable output directory (before any
            training starts).
    """
    start = time.perf_counter()
    cfg = dataclasses.replace(config or DemoConfig(), **overrides)
    cfg.architectures = tuple(cfg.architectures)
    cfg.sweep_k = tuple(float(k) for k in cfg.sweep_k)
    cfg.validate()
    for k in cfg.all_k():
        for name in cfg.architectures:
            try:
                model_config(name, cfg, k)
            except ValueError as e:
                raise DemoError(f"{name} at k={k:g}: {e}") from None
    out_dir = prepare_output_dir(Path(cfg.output_dir))
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with quiet_progress(cfg.show_progress):
            return _run(cfg, out_dir, start)
    finally:
        torch.set_num_threads(threads_before)


class _Evaluator:
    """Evaluates loaded SAEs on the evaluation split and turns them into rows."""

    def __init__(self, cfg: DemoConfig, data: SyntheticData, evaluation: list[torch.Tensor]):
        self.cfg = cfg
        self.data = data
        self.evaluation = evaluation

    def row(
        self,
        sae: Any,
        *,
        name: str,
        architecture: str,
        k: float,
        thresholds: str,
        threshold: str,
        path: Path,
        trained: TrainedModel,
    ) -> ModelResult:
        result = evaluate_sae(
            sae,
            self.evaluation,
            feature_vectors=self.data.feature_vectors,
            show_progress=self.cfg.show_progress,
            description=f"Evaluating {name}",
        )
        return ModelResult(
            **result.metric_fields(),
            name=name,
            architecture=architecture,
            sae_architecture=sae.cfg.architecture(),
            k=float(k),
            thresholds=thresholds,
            threshold=threshold,
            path=str(path),
            train_seconds=trained.seconds,
            train_samples=trained.samples,
            train_samples_per_second=trained.samples / trained.seconds,
        )


def _saved_threshold(name: str, trained: TrainedModel) -> tuple[str, str]:
    """(thresholds, description) of a freshly saved model's row."""
    if not ARCHITECTURE_TABLE[name].thresholds:
        return "per-token top-k", "per-token top-k"
    if name == "batchtopk":
        return SAVED, "saved: SAELens's training EMA"
    tokens = min(trained.samples, trained.sae.cfg.threshold_calibration_tokens)
    return SAVED, f"saved: exact on the last {tokens:,} training tokens"


def _run_models(
    cfg: DemoConfig,
    k: float,
    data: SyntheticData,
    calibration: list[torch.Tensor],
    evaluator: _Evaluator,
    out_dir: Path,
    console: Any,
) -> list[ModelResult]:
    rows = []
    for i, name in enumerate(cfg.architectures, start=1):
        if console is not None:
            console.print(
                f"[bold]k={k:g} · training {name}[/] ({i}/{len(cfg.architectures)}) "
                f"on {cfg.n_steps * cfg.batch_size:,} samples"
            )
        trained = train_model(name, cfg, k, data)
        path = out_dir / name
        save_sae(trained.sae, path, trained.log_feature_sparsity)
        sae = SAE.load_from_disk(path, device=cfg.device)
        thresholds, threshold = _saved_threshold(name, trained)
        common = {"architecture": name, "k": k, "trained": trained}
        rows.append(
            evaluator.row(
                sae, name=name, thresholds=thresholds, threshold=threshold, path=path, **common
            )
        )
        if not ARCHITECTURE_TABLE[name].thresholds:
            continue
        calibrate_thresholds(sae, calibration, show_progress=cfg.show_progress)
        path = out_dir / f"{name}_{RECALIBRATED}"
        save_sae(sae, path, trained.log_feature_sparsity)
        rows.append(
            evaluator.row(
                sae,
                name=f"{name}_{RECALIBRATED}",
                thresholds=RECALIBRATED,
                threshold="calibrate_thresholds on the calibration split",
                path=path,
                **common,
            )
        )
    return rows


def _console(cfg: DemoConfig) -> Any:
    if not cfg.show_progress:
        return None
    from rich.console import Console

    # Off a terminal rich would wrap the table at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(
        f"[bold]sae-lens-choice demo[/]: {cfg.n_features} true features in d_in={cfg.d_in}, "
        f"d_sae={cfg.d_sae}, k={cfg.k:g}, {cfg.n_steps * cfg.batch_size:,} training samples "
        f"per model, device {cfg.device}"
    )
    return console


def _run(cfg: DemoConfig, out_dir: Path, start: float) -> DemoResults:
    sae_dir = out_dir / "saes"
    console = _console(cfg)
    data = SyntheticData(cfg)
    calibration, _ = data.split(CALIBRATION, cfg.calibration_samples)
    evaluation, true_l0 = data.split(EVAL, cfg.eval_samples)
    data_info = {
        "true_l0_eval": true_l0,
        "true_l0_expected": float(data.firing_probabilities.sum()),
        "n_features": cfg.n_features,
        "d_in": cfg.d_in,
        "calibration_samples": cfg.calibration_samples,
        "eval_samples": cfg.eval_samples,
        "synthetic_model": data.model_cfg.to_dict(),
    }
    evaluator = _Evaluator(cfg, data, evaluation)

    models = _run_models(cfg, cfg.k, data, calibration, evaluator, sae_dir, console)
    sweep: list[ModelResult] = []
    if cfg.sweep_k:
        sweep = list(models)
        for k in cfg.all_k()[1:]:
            sweep += _run_models(cfg, k, data, calibration, evaluator, sae_dir / f"k{k:g}", console)

    files = {
        "results_md": str(out_dir / "results.md"),
        "results_json": str(out_dir / "results.json"),
        "density_plot": str(out_dir / "latent_density_by_rank.png"),
        "l0_histogram_plot": str(out_dir / "l0_per_token_histogram.png"),
        "saes": str(sae_dir),
    }
    plot_densities(models, data.firing_probabilities, Path(files["density_plot"]))
    plot_l0_histograms(models, Path(files["l0_histogram_plot"]))
    if sweep:
        files["frontier_plot"] = str(out_dir / "nmse_vs_l0_frontier.png")
        plot_frontier(sweep, Path(files["frontier_plot"]))

    results = DemoResults(cfg, data_info, models, sweep, out_dir, files, wall_seconds=0.0)
    results.wall_seconds = time.perf_counter() - start
    Path(files["results_md"]).write_text(results.to_markdown())
    write_json(results, Path(files["results_json"]))

    if console is not None:
        console.print(rich_table(models, f"k = {cfg.k:g}, per-token inference"))
        for line in findings(results):
            console.print(f"- {line}", highlight=False)
        if sweep:
            console.print(rich_table(sweep, "k sweep", with_k=True))
        example = sae_dir / "mutual_choice"
        if not example.exists():
            example = Path(models[0].path)
        console.print(
            f"Results: {files['results_md']}, {files['results_json']}; plots in {out_dir}.\n"
            f"SAEs (SAELens format, with sparsity.safetensors) under {sae_dir}; they load "
            "with plain SAELens, no plugin needed:\n"
            f"    from sae_lens import SAE\n"
            f"    sae = SAE.load_from_disk({str(example)!r})\n"
            "Exact batch-mode encoding (the training allocation): "
            "sae_lens_choice.encode_batch(sae, x).\n"
            f"Demo wall time: {results.wall_seconds:.1f} s"
        )
    return results
