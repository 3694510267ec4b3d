"""``sae-lens-choice demo`` and ``sae-lens-choice zipf-fit``.

Each command function takes the arguments after the command name and returns
the exit code: 0, or 2 for a usage error (printed as ``PROG: error: ...``,
with no traceback, before anything is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sae_lens_choice.demo.architectures import ARCHITECTURES
from sae_lens_choice.demo.config import DemoConfig, DemoError, prepare_output_dir
from sae_lens_choice.demo.plots import (
    RANK_LABEL,
    label_and_save,
    new_figure,
    plot_fit_curves,
    supported_formats,
)
from sae_lens_choice.demo.run import run_demo
from sae_lens_choice.demo.saved import find_sparsity_files, load_sparsity
from sae_lens_choice.validation import check_number
from sae_lens_choice.zipf import ZipfFit, fit_zipf

__all__ = ["demo_main", "demo_parser", "zipf_fit_main", "zipf_fit_parser"]


def _number(
    integer: bool, *, gt: float | None = None, ge: float | None = None
) -> Callable[[str], float]:
    """An argparse ``type``: a number within the bounds (see ``validation.check_number``)."""

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not {'an integer' if integer else 'a number'}: {text!r}"
            ) from None
        try:
            return check_number(value, "the value", integer=integer, gt=gt, ge=ge)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_positive_float = _number(False, gt=0)
_positive_int = _number(True, gt=0)
_non_negative_int = _number(True, ge=0)


def demo_parser(prog: str = "sae-lens-choice demo") -> argparse.ArgumentParser:
    """The ``demo`` subcommand's argument parser."""
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train TopK, BatchTopK, Mutual Choice and Feature Choice (uniform and Zipf "
            "capacities) SAEs on SAELens synthetic data with known ground truth, save them "
            "(SAELens format), load them back and evaluate them per token, with their saved "
            "thresholds and recalibrated on held-out data; write a results table, JSON and plots."
        ),
    )
    p.add_argument("--output-dir", default=str(d.output_dir), help="default: %(default)s")
    p.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="multiply sample counts and widths (d_in, n_features, d_sae) by this; explicit "
        "flags below override (default: %(default)s)",
    )
    p.add_argument("--d-in", type=_positive_int, help=f"activation width (default {d.d_in})")
    p.add_argument(
        "--n-features", type=_positive_int, help=f"true features (default {d.n_features})"
    )
    p.add_argument("--d-sae", type=_positive_int, help=f"SAE latents (default {d.d_sae})")
    p.add_argument("--k", type=_positive_float, help=f"expected L0 per token (default {d.k:g})")
    p.add_argument(
        "--training-samples",
        type=_positive_int,
        help=f"training samples per model (default {d.training_samples})",
    )
    p.add_argument("--batch-size", type=_positive_int, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=_positive_float, help=f"learning rate (default {d.lr:g})")
    p.add_argument(
        "--dead-feature-window",
        type=_positive_int,
        help="steps without firing before a latent counts as dead (default: an eighth of "
        "the steps, 10..1000)",
    )
    p.add_argument(
        "--calibration-samples", type=_positive_int, help=f"default {d.calibration_samples}"
    )
    p.add_argument("--eval-samples", type=_positive_int, help=f"default {d.eval_samples}")
    p.add_argument("--seed", type=_non_negative_int, default=d.seed, help="default: %(default)s")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=_non_negative_int,
        default=d.threads,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s, see "
        "DemoConfig.threads)",
    )
    p.add_argument(
        "--architectures",
        nargs="+",
        choices=ARCHITECTURES,
        default=list(ARCHITECTURES),
        metavar="ARCH",
        help=f"subset of {', '.join(ARCHITECTURES)} (default: all)",
    )
    p.add_argument(
        "--sweep-k",
        nargs="+",
        type=_positive_float,
        default=[],
        metavar="K",
        help="also train every architecture at these k and plot the NMSE-vs-L0 frontier",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


_SIZE_FLAGS = (
    "d_in",
    "n_features",
    "d_sae",
    "k",
    "training_samples",
    "batch_size",
    "lr",
    "dead_feature_window",
    "calibration_samples",
    "eval_samples",
)


def _config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig().scaled(args.scale) if args.scale != 1.0 else DemoConfig()
    explicit = {
        name: getattr(args, name) for name in _SIZE_FLAGS if getattr(args, name) is not None
    }
    return dataclasses.replace(
        cfg,
        **explicit,
        seed=args.seed,
        device=args.device,
        threads=args.threads or None,
        architectures=tuple(args.architectures),
        sweep_k=tuple(args.sweep_k),
        output_dir=args.output_dir,
        show_progress=not args.quiet,
    )


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def demo_main(argv: list[str] | None = None) -> int:
    """``sae-lens-choice demo [flags]``; returns the exit code (2 on bad flags)."""
    parser = demo_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    try:
        run_demo(_config_from_args(args))
    except DemoError as e:
        return _error(parser.prog, str(e))
    return 0


# ---------------------------------------------------------------------------
# zipf-fit
# ---------------------------------------------------------------------------


def zipf_fit_parser(prog: str = "sae-lens-choice zipf-fit") -> argparse.ArgumentParser:
    """The ``zipf-fit`` subcommand's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fit a Zipf–Mandelbrot law p(r) = C / (r + beta)^alpha to the latent densities of "
            "saved SAEs (SAELens's sparsity.safetensors, log10 densities) and plot density by "
            "rank. PATH is a sparsity.safetensors file or a directory searched recursively."
        ),
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--rank-window",
        nargs=2,
        type=_positive_int,
        metavar=("LO", "HI"),
        help="1-based inclusive ranks to fit on (default: all ranks)",
    )
    p.add_argument(
        "--output",
        default="zipf_fit.png",
        help="plot to write; its suffix picks the format (.png, .pdf, .svg, ...; "
        "default: %(default)s)",
    )
    return p


def _check_output(output: Path) -> None:
    """Refuse, before any work, a plot path matplotlib cannot write."""
    formats = supported_formats()
    suffix = output.suffix.lower().removeprefix(".")
    if suffix not in formats:
        given = f"suffix {output.suffix!r}" if output.suffix else "no suffix"
        raise DemoError(
            f"--output {str(output)!r} has {given}; the plot is written by matplotlib, which "
            f"saves {', '.join('.' + f for f in formats)} (for example --output zipf_fit.png)"
        )
    if output.parent != Path() and not output.parent.is_dir():
        prepare_output_dir(output.parent)


_Curve = tuple[Path, torch.Tensor, ZipfFit, ZipfFit]  # file, densities, window fit, all-ranks fit


def _fit_files(files: list[Path], window: tuple[int, int] | None) -> list[_Curve]:
    curves = []
    for f in files:
        try:
            densities = load_sparsity(f)
        except DemoError:
            raise
        except Exception as e:  # a corrupt or foreign file
            raise DemoError(f"cannot read {f}: {e}") from None
        if not bool((densities > 0).any()):
            raise DemoError(f"{f}: every latent is dead (density 0); nothing to fit")
        if window is not None and window[0] > densities.numel():
            raise DemoError(
                f"--rank-window {window[0]} {window[1]}: {f} has only {densities.numel()} latents"
            )
        fit_all = fit_zipf(densities)
        fit_window = fit_zipf(densities, window) if window is not None else fit_all
        curves.append((f, densities, fit_window, fit_all))
    return curves


def zipf_fit_main(argv: list[str] | None = None) -> int:
    """``sae-lens-choice zipf-fit PATH``; returns the exit code (2 on bad input)."""
    parser = zipf_fit_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    window: tuple[int, int] | None = None
    if args.rank_window is not None:
        lo, hi = args.rank_window
        if hi < lo:
            return _error(parser.prog, f"--rank-window needs LO <= HI, got {lo} {hi}")
        window = (lo, hi)
    output = Path(args.output)
    root = Path(args.path)
    try:
        _check_output(output)
        files = find_sparsity_files(root)
        if not files:
            raise DemoError(f"no sparsity.safetensors found under {args.path!r}")
        curves = _fit_files(files, window)
    except DemoError as e:
        return _error(parser.prog, str(e))

    win_text = f"ranks {window[0]}–{window[1]}" if window else "all ranks"
    for f, densities, fit_window, fit_all in curves:
        name = str(f.parent.relative_to(root)) if root.is_dir() else str(f)
        n_dead = int((densities == 0).sum())
        print(f"{name}  ({densities.numel()} latents, {n_dead} dead)")
        for label, fit in ((win_text, fit_window), ("all ranks", fit_all)):
            v = fit.to_dict()
            print(
                f"  {label:>18}: alpha={v['alpha']:.4f}  beta={v['beta']:.4f}  "
                f"R^2={v['r2']:.4f}  (n={int(v['n_points'])})"
            )
            if window is None:
                break

    fig = new_figure()
    ax = fig.add_subplot()
    plot_fit_curves(
        ax,
        [
            (
                str(f.parent.relative_to(root)) if root.is_dir() else f.parent.name,
                densities,
                fit_window,
                window or (1, densities.numel()),
                {"color": f"C{i % 10}", "ls": "-"},
            )
            for i, (f, densities, fit_window, _) in enumerate(curves)
        ],
    )
    try:
        label_and_save(
            fig,
            ax,
            output,
            title=f"Latent density by rank; dashed: Zipf–Mandelbrot fit ({win_text})",
            xlabel=RANK_LABEL,
            ylabel="firing density",
        )
    except (OSError, ValueError, RuntimeError) as e:
        return _error(parser.prog, f"cannot write {str(output)!r}: {e}")
    print(f"plot: {output}")
    return 0
