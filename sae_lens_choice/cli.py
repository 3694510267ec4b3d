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
the default ``--architecture``. Two options of ours run it data-parallel
(:mod:`sae_lens_choice.distributed_training`)::

    sae-lens-choice train --nproc-per-node 8 --device cuda ...   # re-runs itself under torchrun
    torchrun --standalone --nproc-per-node 8 -m sae_lens_choice train --device cuda ...

``--dist-timeout SECONDS`` sets how long a rank waits for the others.
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

__all__ = [
    "COMMANDS",
    "Command",
    "LaunchOptions",
    "command_prog",
    "main",
    "parse_train_args",
    "split_launch_args",
    "torchrun_command",
    "torchrun_world_size",
]


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
        "(SAELens's training flags plus ours; default --architecture mutual_choice; "
        "--nproc-per-node N trains data-parallel)",
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


_NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")
_TIMEOUT_FLAGS = ("--dist-timeout", "--dist_timeout")
_LAUNCH_HELP = """
data-parallel training (sae-lens-choice's own options; see "Training on several GPUs"):
  --nproc-per-node N    train on N processes of this machine (one GPU each with --device cuda,
                        gloo on CPU): re-runs this command under `python -m
                        torch.distributed.run --standalone`. Under torchrun itself, leave it out.
  --dist-timeout SECONDS
                        how long a rank waits for the others in a collective before failing
                        (default 600)
"""


@dataclass(frozen=True)
class LaunchOptions:
    """The ``train`` options that are not SAELens's: how to run, not what to train.

    Args:
        nproc_per_node: ``--nproc-per-node``: processes to launch (``None``: not given).
        dist_timeout_s: ``--dist-timeout``: seconds a collective waits for the
            other ranks (``None``: not given; the default is
            ``distributed_training.DEFAULT_TIMEOUT_S``).
    """

    nproc_per_node: int | None = None
    dist_timeout_s: float | None = None


def split_launch_args(argv: Sequence[str]) -> tuple[LaunchOptions, list[str]]:
    """Take ``--nproc-per-node`` and ``--dist-timeout`` out of ``train``'s arguments.

    Accepts ``--flag VALUE`` and ``--flag=VALUE``, with dashes or underscores.
    Returns the options and the remaining (SAELens) arguments.

    Raises:
        SystemExit: 2, naming the flag, on a missing or invalid value.
    """
    nproc: int | None = None
    timeout: float | None = None
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in _NPROC_FLAGS + _TIMEOUT_FLAGS:
            rest.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                _train_error(f"argument {name}: expected one value")
            value = args[i + 1]
            i += 1
        i += 1
        try:
            if name in _NPROC_FLAGS:
                nproc = int(value)
                ok = nproc >= 1
            else:
                timeout = float(value)
                ok = timeout > 0 and timeout != float("inf")
        except ValueError:
            ok = False
        if not ok:
            kind = "a positive integer" if name in _NPROC_FLAGS else "a positive number of seconds"
            _train_error(f"argument {name}: expected {kind}, got {value!r}")
    return LaunchOptions(nproc, timeout), rest


def torchrun_command(nproc_per_node: int, train_args: Sequence[str]) -> list[str]:
    """The command ``train --nproc-per-node N`` re-executes itself as.

    ``python -m torch.distributed.run --standalone --nproc-per-node N -m
    sae_lens_choice train ARGS``: one machine, a free rendezvous port, and each
    worker runs ``train`` with the same arguments (without
    ``--nproc-per-node``).
    """
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc_per_node}", "-m", "sae_lens_choice", "train", *train_args,
    ]  # fmt: skip


def torchrun_world_size() -> int | None:
    """``WORLD_SIZE`` when this process is a torchrun worker, else ``None``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def train_command(argv: list[str]) -> int:
    """``sae-lens-choice train``: parse, then run ``LanguageModelSAETrainingRunner``.

    With ``--nproc-per-node N`` (N > 1): check the arguments, then re-execute
    under ``torch.distributed.run`` (:func:`torchrun_command`). As a torchrun
    worker of a world of more than one rank: train data-parallel
    (``distributed_training.train_distributed``).
    """
    options, rest = split_launch_args(argv)
    world = torchrun_world_size()
    if options.nproc_per_node is not None and world is not None:
        _train_error(
            "--nproc-per-node launches torchrun, but this process already runs under torchrun "
            f"(WORLD_SIZE={world}); leave --nproc-per-node out"
        )
    try:
        cfg = parse_train_args(rest)  # arguments are checked once, before any launch
    except SystemExit as exc:
        if exc.code == 0 and ("--help" in rest or "-h" in rest):
            print(_LAUNCH_HELP)
        raise
    timeout_args = []
    if options.dist_timeout_s is not None:
        timeout_args = ["--dist-timeout", repr(options.dist_timeout_s)]
    if options.nproc_per_node is not None and options.nproc_per_node > 1:
        command = torchrun_command(options.nproc_per_node, [*timeout_args, *rest])
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
    if world is not None and world > 1:
        from sae_lens_choice import distributed_training

        kwargs = {}
        if options.dist_timeout_s is not None:
            kwargs["timeout_s"] = options.dist_timeout_s
        distributed_training.train_distributed(cfg, **kwargs)
        return 0
    from sae_lens import LanguageModelSAETrainingRunner

    LanguageModelSAETrainingRunner(cfg=cfg).run()
    return 0
