"""The ``sae-lens-choice`` command (also ``python -m sae_lens_choice``).

Usage::

    sae-lens-choice COMMAND [ARGS...]
    sae-lens-choice train --architecture mutual_choice --k 32 --d_in 768 --d_sae 16384 ...
    sae-lens-choice train --architecture feature_choice --help

Subcommands live in :data:`COMMANDS`: a name, one line of help, and the
implementing function as ``"module:function"``, imported only when that
command runs (so ``--help`` stays fast and a command's heavy dependencies load
only for it). The function takes the arguments after the command name and
returns an exit code; it may parse them with its own ``argparse`` parser
(``prog=command_prog(name)``), whose errors exit with status 2. Adding a
subcommand is writing that function and adding one :data:`COMMANDS` entry.

``train`` is SAELens's own training CLI (``python -m
sae_lens.llm_sae_training_runner``): the same parser, so every flag it accepts
is accepted here, with our architectures registered and ``mutual_choice`` as
the default ``--architecture``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from sae_lens import LanguageModelSAERunnerConfig

PROG = "sae-lens-choice"
DEFAULT_ARCHITECTURE = "mutual_choice"

__all__ = ["COMMANDS", "Command", "command_prog", "main", "parse_train_args"]


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Args:
        help: one line shown by ``sae-lens-choice --help``.
        target: ``"module:function"``; the function takes the command's own
            arguments (``list[str]``) and returns an exit code.
    """

    help: str
    target: str

    def load(self) -> Callable[[list[str]], int]:
        module_name, _, function_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function_name)


# Other commands ("demo", "zipf-fit", "export-jumprelu") are added here, one
# entry each, pointing at a function in whichever module implements them.
COMMANDS: dict[str, Command] = {
    "train": Command(
        help="train an SAE with SAELens's LanguageModelSAETrainingRunner "
        "(SAELens's training flags plus ours; default --architecture mutual_choice)",
        target="sae_lens_choice.cli:train_command",
    ),
    "demo": Command(
        help="compare topk, batchtopk, mutual_choice and feature_choice on synthetic data "
        "with known ground truth (the main job; <= 5 min on 2 CPU cores)",
        target="sae_lens_choice.demo.cli:demo_main",
    ),
    "zipf-fit": Command(
        help="fit a Zipf-Mandelbrot law to saved latent densities (sparsity.safetensors) "
        "and plot rank vs density",
        target="sae_lens_choice.demo.cli:zipf_fit_main",
    ),
    "export-jumprelu": Command(
        help="convert a saved mutual_choice/feature_choice SAE into SAELens's own jumprelu "
        "format, loadable without this plugin",
        target="sae_lens_choice.export:export_jumprelu_cli",
    ),
}


def command_prog(name: str) -> str:
    """The ``prog`` a subcommand's parser should use in usage and error lines."""
    return f"{PROG} {name}"


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Feature Choice and Mutual Choice sparse autoencoders for SAELens "
        "(Ayonrinde 2024, arXiv 2411.02124).",
        epilog=f"commands:\n{listing}\n\nRun `{PROG} COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below"
    )
    return parser


def _version() -> str:
    from sae_lens_choice import __version__

    return __version__


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    # Options before the first positional belong to the top-level parser; the
    # command name and everything after it go to the command (so `train --help`
    # reaches train's parser, not ours).
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            return argv[: i + 1], argv[i + 1 :]
    return argv, []


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sae-lens-choice`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    ``--help`` returns 0; a usage error prints a message and returns 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    top, rest = _split_command(args)
    try:
        if not top:
            parser.print_help(sys.stderr)
            return 2
        command = parser.parse_args(top).command
        return COMMANDS[command].load()(rest)
    except SystemExit as exc:
        return _exit_code(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `sae-lens-choice zipf-fit ... | head`: the reader left; exit quietly
        # (Python would otherwise print a traceback while flushing stdout).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

_TRAIN_PROG = command_prog("train")
_ARCHITECTURE_FLAGS = ("--architecture", "--sae")


def _expand_architecture_flag(arg: str) -> str:
    # SAELens's parser resolves --architecture in a separate pass that ignores
    # abbreviations (`--arch x` would silently select the default): expand them.
    name, eq, value = arg.partition("=")
    if len(name) >= 4 and "--architecture".startswith(name):
        return f"--architecture{eq}{value}"
    return arg


def _names_architecture(args: Sequence[str]) -> bool:
    return any(arg.partition("=")[0] in _ARCHITECTURE_FLAGS for arg in args)


@contextmanager
def _argv0(prog: str) -> Iterator[None]:
    # argparse takes its default `prog` from sys.argv[0]; SAELens's parser
    # gives no other way to name the command in usage and error lines.
    saved = sys.argv[:1]
    if sys.argv:
        sys.argv[0] = prog
    else:
        sys.argv.append(prog)
    try:
        yield
    finally:
        sys.argv[:1] = saved


def _train_error(message: str) -> NoReturn:
    print(
        f"usage: {_TRAIN_PROG} --architecture {{mutual_choice,feature_choice,...}} [options]\n"
        f"{_TRAIN_PROG}: error: {message}\n"
        f"(run `{_TRAIN_PROG} --architecture ARCH --help` for the options)",
        file=sys.stderr,
    )
    raise SystemExit(2)


def parse_train_args(argv: Sequence[str]) -> LanguageModelSAERunnerConfig[Any]:
    """Parse ``train`` arguments into a ``LanguageModelSAERunnerConfig`` (runs nothing).

    Uses SAELens's own training-CLI parser
    (``sae_lens.llm_sae_training_runner._parse_cfg_args``), so every flag of
    ``python -m sae_lens.llm_sae_training_runner`` is accepted, plus the fields
    of the chosen architecture's training config (``--k``, ``--capacity``,
    ``--zipf_alpha``, ...). ``--architecture`` defaults to ``mutual_choice``;
    no arguments at all shows the help.

    Raises:
        SystemExit: 0 after ``--help``; 2, with a message naming the flag or
            config field, on an unknown flag or an invalid value.
    """
    from sae_lens.llm_sae_training_runner import _parse_cfg_args

    import sae_lens_choice  # noqa: F401  (importing it registers our architectures)

    args = [_expand_architecture_flag(arg) for arg in argv] or ["--help"]
    if not _names_architecture(args):
        args = ["--architecture", DEFAULT_ARCHITECTURE, *args]
    with _argv0(_TRAIN_PROG):
        try:
            return _parse_cfg_args(args)
        except argparse.ArgumentError as exc:
            # "argument --capacity: invalid choice: 'bogus' (choose from ...)"
            _train_error(str(exc))
        except (ValueError, TypeError) as exc:
            # config validation: "feature_choice config: k must be > 0 ..."
            _train_error(str(exc))


def train_command(argv: list[str]) -> int:
    """``sae-lens-choice train``: parse, then run ``LanguageModelSAETrainingRunner``."""
    cfg = parse_train_args(argv)
    from sae_lens import LanguageModelSAETrainingRunner

    LanguageModelSAETrainingRunner(cfg=cfg).run()
    return 0
