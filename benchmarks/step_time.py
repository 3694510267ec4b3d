"""Time a full training step of each architecture against SAELens's dense TopK.

Issue 12: a Mutual / Feature Choice step whose sparse path (decode and
backward from the kept pairs, :mod:`sae_lens_choice.sparse`) approaches the
FLOP bound. This script measures the step of SAELens's ``topk`` (dense, and
with its ``use_sparse_activations=True``), ``batchtopk``, and ours (Mutual
Choice, Feature Choice with uniform and with Zipf capacities), each of ours with
``step_implementation="dense"`` and ``"sparse"``, in one interleaved run.

What one step is: exactly what SAELens's ``SAETrainer._train_step`` does with
the SAE, minus its logging bookkeeping::

    out = sae.training_forward_pass(TrainStepInput(sae_in, {}, dead_neuron_mask,
                                                   n_training_steps, is_logging_step=False))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    adam.step()
    adam.zero_grad()

``is_logging_step`` stays ``False`` (the production hot path: no metrics).
Each SAE keeps its own step counter, so the scheduled work (the Zipf refit
every ``zipf_refit_every`` steps, the finiteness check every
``check_finite_every``) happens as often as in real training.

Rows: the configs are built from
:data:`sae_lens_choice.demo.architectures.ARCHITECTURE_TABLE` (its rows, and
:meth:`~sae_lens_choice.demo.architectures.Architecture.variant` of them for
the dense / sparse step and for SAELens's sparse activations), at float32 with
every other field at its default (``rescale_acts_by_decoder_norm=True``,
TopK's default; our aux losses as the table sets them: ``aux_zipf`` for Mutual
Choice, none for Feature Choice). Same seed, same ``sae_in``, same
``dead_neuron_mask`` for all. A row whose step raises (SAELens 6.54's sparse
TopK on CPU: its backward calls ``aten::view`` on a SparseCPU tensor) is
reported as ``fails: <error>`` and left out of the timing.

Blocks: each size times each ``--dead-fracs`` value. ``dead_neuron_mask`` marks
a fixed random fraction of the latents: with 0, SAELens's TopK skips its aux
loss (it reads the dead count back and returns early); with 1% every
architecture with an aux loss pays for it, as in real training once a few
latents have died.

Timing: after ``--warmup`` untimed steps per row, the rows take turns
(A B C ..., A B C ...) for ``--rounds`` rounds; each sample is ``--steps``
consecutive steps of one row. Reported per row: the median time per step, and
the median over rounds of the ratio to ``topk`` *in the same round* (so slow
drift of the machine's load cancels); also the mean and the ratio of means,
which include the work scheduled every few steps (the ``aux_zipf`` refit every
10 steps) amortised. Compare ratios, not milliseconds, across machines. On CUDA
every sample is bracketed by ``torch.cuda.synchronize()``.

Peak memory: the step's peak *above* the resting state (model, Adam state,
inputs), so the ratio compares what the step itself allocates.

- CUDA: ``torch.cuda.max_memory_allocated()`` during one step (after
  ``reset_peak_memory_stats``) minus ``torch.cuda.memory_allocated()`` before it.
- CPU: the process's resident-set high-water mark. Each row runs in a fresh
  subprocess (no other model or freed memory resident): it builds the SAE,
  runs the warm-up steps (Adam's state now exists), sets glibc's mmap
  threshold to 64 KiB (``mallopt``) and trims the heap so freed tensors go back
  to the OS, reads ``VmRSS``, resets ``VmHWM`` through
  ``/proc/self/clear_refs``, runs one step and reads ``VmHWM``. torch's CPU
  allocator does not cache, so the difference is every tensor the step held at
  once, plus a little allocator slack. ``--quick`` measures in-process instead
  (same recipe, no fresh process), to stay within seconds.

FLOP bound (column ``FLOP bound``): the fewest FLOPs the row's method needs,
over the FLOPs SAELens's dense TopK step performs, both counted as follows. Let
``E = 2 * N * d_in * d_sae``, one dense (N, d_in) x (d_in, d_sae) product.

- Denominator, SAELens's dense TopK step: ``6 E`` with no dead latent (encoder
  forward; decoder forward; decoder backward for the activations and for
  ``W_dec``; encoder backward for ``W_enc`` and for ``sae_in``, which needs a
  gradient because ``b_dec`` is subtracted from the input), ``9 E`` with dead
  latents (its aux loss decodes a second dense (N, d_sae) matrix: forward, and
  backward for the activations and for ``W_dec``; its gradient joins the main
  one before the encoder backward).
- Numerator, the bound: ``E`` (the encoder forward, which the selection needs
  in full) plus ``10 * d_in`` FLOPs per kept (token, latent) pair: five
  products touch each pair once with ``2 * d_in`` FLOPs, the decode, and in
  the backward the pair's activation gradient, its ``W_dec`` row, its ``W_enc``
  column and its ``sae_in`` row. Pairs: ``k * N`` kept ones, plus, for the rows
  with an aux loss on dead latents (``topk``, ``batchtopk``, Mutual Choice's
  ``aux_zipf``), ``N * min(d_in // 2, n_dead)`` aux pairs (``aux_zipf`` also
  takes under-used latents when there are some: not counted). Feature Choice
  rows here have no aux loss.
- Not counted on either side: the selection (comparisons, no FLOPs), and the
  element-wise work (biases, decoder-norm rescaling, losses, gradient clipping,
  Adam: O(d_in * d_sae) per step, under 2% of ``E`` at these sizes).

The bound is the same for a row's dense and sparse step: it says how far the
measured time ratio is from what the method allows. At size 1 with no dead
latent it is about 0.17.

Sizes: ``1`` = N=4096 tokens, d_in=768, d_sae=16384, k=32;
``2`` = N=1024, d_in=512, d_sae=65536, k=16; ``--quick`` uses tiny versions.

Output: Markdown tables on stdout, one per block as it finishes and a summary
at the end; with ``--json PATH`` the JSON is rewritten after every block, so
an interrupted run keeps its finished blocks, and ``--resume`` skips the
blocks already in ``PATH`` (same settings) and measures the rest.

Runtime of the full run (both sizes, 0% and 1% dead, 10 rounds, CPU memory
probes) on the 2-core CPU: about 95 minutes when the machine is quiet, longer
under load (a step of TopK at size 1 takes ~10 s there).

``--crossover``: dense against sparse step time of Mutual Choice (``aux_zipf``)
and Feature Choice (Zipf capacities) over a grid of (d_in, d_sae, N, k), no
dead latents. Each grid point's four rows take turns for ``--rounds`` rounds;
a sample is as many steps as fill ``--min-sample-s`` seconds (at least one). It
reports the median same-round ratio sparse / dense per point and architecture,
a d_in x d_sae matrix of their medians over N, k and the two architectures,
and the rule of the form ``d_sae >= X and d_in >= Y`` that loses the least time
over the grid (sum over points of log(chosen / faster)), next to the current
:func:`sae_lens_choice.choice_base.sparse_step_pays` rule.

Commands (from the repository root)::

    python -m benchmarks.step_time --json docs/step_time.json   # the full table, CPU
    python -m benchmarks.step_time --json out.json --resume     # finish an interrupted run
    python -m benchmarks.step_time --sizes 1 --dead-fracs 0     # one block
    python -m benchmarks.step_time --device cuda --json gpu.json
    python -m benchmarks.step_time --crossover --json crossover.json
    python -m benchmarks.step_time --quick --json /tmp/q.json   # seconds: the smoke test
    python -m benchmarks.step_time --crossover --quick          # seconds: the smoke test

Run it on a quiet machine: other processes on the cores make the
milliseconds meaningless and blur the ratios (the JSON records the 1-minute
load average before and after every block).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

import sae_lens_choice  # noqa: F401  (registers our architectures with SAELens)
from sae_lens_choice import allocation
from sae_lens_choice.choice_base import sparse_step_pays
from sae_lens_choice.demo.architectures import ARCHITECTURE_TABLE, Architecture
from sae_lens_choice.losses import default_k_aux

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    name: str
    n_tokens: int
    d_in: int
    d_sae: int
    k: int


SIZES = {
    "1": Size("1", 4096, 768, 16384, 32),
    "2": Size("2", 1024, 512, 65536, 16),
}
QUICK_SIZES = {
    "1": Size("1q", 256, 64, 1024, 8),
    "2": Size("2q", 64, 32, 4096, 4),
}
DEAD_FRACS = (0.0, 0.01)
BASELINE = "topk"
SEED = 0
OURS = ("mutual_choice", "feature_choice_uniform", "feature_choice_zipf")
STEP_IMPLEMENTATIONS = ("dense", "sparse")
CROSSOVER_ARCHS = ("mutual_choice", "feature_choice_zipf")


def step_rows(table: Mapping[str, Architecture] = ARCHITECTURE_TABLE) -> dict[str, Architecture]:
    """The rows of the table: SAELens's TopK (dense, sparse), BatchTopK, ours dense and sparse.

    Variants of ``table``'s rows (no second table): ``<name>_<implementation>``
    for ours, ``topk_sparse`` for TopK with ``use_sparse_activations=True``.
    """
    topk = table["topk"]
    rows = {
        "topk": topk,
        "topk_sparse": topk.variant(
            "topk_sparse", f"{topk.label}, use_sparse_activations", use_sparse_activations=True
        ),
        "batchtopk": table["batchtopk"],
    }
    for name in OURS:
        for impl in STEP_IMPLEMENTATIONS:
            rows[f"{name}_{impl}"] = table[name].variant(
                f"{name}_{impl}", f"{table[name].label}, {impl} step", step_implementation=impl
            )
    return rows


ROWS = step_rows()


# ---------------------------------------------------------------------------
# what is timed
# ---------------------------------------------------------------------------


def build_sae(row: Architecture, size: Size, device: str) -> torch.nn.Module:
    """The training SAE of ``row`` at ``size``, float32, seeded (same weights where shapes agree)."""
    cfg = row.training_config(
        d_in=size.d_in, d_sae=size.d_sae, k=size.k, device=device, dtype="float32"
    )
    sae_class, _ = get_sae_training_class(cfg.architecture())
    torch.manual_seed(SEED)
    return sae_class(cfg)


def make_inputs(size: Size, device: str, dead_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sae_in (N, d_in), dead_neuron_mask (F,)), the same for every row."""
    gen = torch.Generator().manual_seed(SEED + 1)
    sae_in = torch.randn(size.n_tokens, size.d_in, generator=gen)  # (N, d_in)
    dead = torch.zeros(size.d_sae, dtype=torch.bool)  # (F,)
    dead[torch.randperm(size.d_sae, generator=gen)[: n_dead(size, dead_frac)]] = True
    return sae_in.to(device), dead.to(device)


def n_dead(size: Size, dead_frac: float) -> int:
    return round(dead_frac * size.d_sae)


class StepRunner:
    """One row's SAE, optimizer and step counter; calling it runs one training step."""

    def __init__(self, row: Architecture, size: Size, device: str, dead_frac: float):
        self.row = row
        self.sae = build_sae(row, size, device)
        self.sae.train()
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.sae_in, self.dead = make_inputs(size, device, dead_frac)
        self.n_steps = 0

    def __call__(self) -> None:
        out = self.sae.training_forward_pass(  # type: ignore[operator]
            TrainStepInput(
                sae_in=self.sae_in,
                coefficients={},
                dead_neuron_mask=self.dead,
                n_training_steps=self.n_steps,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.n_steps += 1


def failure(error: BaseException) -> str:
    """A one-line description of a row's failure, for the table."""
    first = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {first[0] if first else ''}"
    # torch's dispatcher errors go on to list every backend: the first sentence says it
    return text.split(". This could be")[0][:200]


@contextlib.contextmanager
def count_mc_fallbacks() -> Iterator[list[int]]:
    """Count calls of the Mutual Choice fallback (the candidate pool was widened)."""
    counter = [0]
    name = "_widen_candidates"
    original = getattr(allocation, name, None)
    if original is None:  # an allocation module without the shortcut: nothing to count
        yield counter
        return

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    setattr(allocation, name, counted)
    try:
        yield counter
    finally:
        setattr(allocation, name, original)


# ---------------------------------------------------------------------------
# FLOP bound
# ---------------------------------------------------------------------------


def has_dead_aux(row: Architecture) -> bool:
    """Whether the row's step runs an aux loss on the dead latents (see the module docstring)."""
    return row.options.get("aux_loss", "aux_k") != "none"


def topk_dense_flops(size: Size, dead: int) -> float:
    """FLOPs of SAELens's dense TopK step: 6 dense products, 9 with dead latents."""
    e = 2.0 * size.n_tokens * size.d_in * size.d_sae
    return (9 if dead > 0 else 6) * e


def bound_flops(row: Architecture, size: Size, dead: int) -> float:
    """The fewest FLOPs ``row``'s method needs: the encoder forward and 10 d_in per pair."""
    e = 2.0 * size.n_tokens * size.d_in * size.d_sae
    pairs = size.k * size.n_tokens
    if has_dead_aux(row) and dead > 0:
        pairs += size.n_tokens * min(default_k_aux(size.d_in), dead)
    return e + 10.0 * size.d_in * pairs


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class RowResult:
    device: str
    size: str
    n_tokens: int
    d_in: int
    d_sae: int
    k: int
    dead_frac: float
    n_dead: int
    arch: str
    label: str
    status: str = "ok"
    ms_median: float = float("nan")
    ms_mean: float = float("nan")
    ms_min: float = float("nan")
    ms_samples: list[float] = field(default_factory=list)
    ratio_median: float = float("nan")
    ratio_of_means: float = float("nan")
    ratios: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    peak_ratio: float = float("nan")
    peak_total_mb: float = float("nan")
    flop_bound_ratio: float = float("nan")
    mc_fallbacks: int | None = None
    mc_fallback_steps: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _ms_per_step(runner: Callable[[], None], steps: int, device: str) -> float:
    """Milliseconds per step over ``steps`` consecutive calls, the device synchronised around."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def _size_fields(device: str, size: Size, dead_frac: float) -> dict[str, Any]:
    return {
        "device": device,
        "size": size.name,
        "n_tokens": size.n_tokens,
        "d_in": size.d_in,
        "d_sae": size.d_sae,
        "k": size.k,
        "dead_frac": dead_frac,
        "n_dead": n_dead(size, dead_frac),
    }


def _median_ratio(samples: list[float], base: list[float]) -> tuple[float, list[float]]:
    ratios = [t / b for t, b in zip(samples, base, strict=True)]
    return statistics.median(ratios), ratios


def time_block(
    rows: Mapping[str, Architecture],
    size: Size,
    device: str,
    dead_frac: float,
    rounds: int,
    warmup: int,
    steps: int,
) -> list[RowResult]:
    """One block: every row's step, interleaved, with ratios to ``topk`` per round."""
    dead = n_dead(size, dead_frac)
    results = {
        name: RowResult(
            **_size_fields(device, size, dead_frac),
            arch=name,
            label=row.label,
            flop_bound_ratio=bound_flops(row, size, dead) / topk_dense_flops(size, dead),
        )
        for name, row in rows.items()
    }
    runners: dict[str, StepRunner] = {}
    for name, row in rows.items():
        try:
            runner = StepRunner(row, size, device, dead_frac)
            for _ in range(max(warmup, 1)):
                runner()
        except (RuntimeError, NotImplementedError, ValueError) as error:
            results[name].status = f"fails: {failure(error)}"
            print(f"  {name}: {results[name].status}", flush=True)
            continue
        runners[name] = runner
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    fallbacks = 0
    with count_mc_fallbacks() as counter:
        for _ in range(rounds):
            for name, runner in runners.items():
                before = counter[0]
                gc.collect()
                samples[name].append(_ms_per_step(runner, steps, device))
                if name.startswith("mutual_choice"):
                    fallbacks += counter[0] - before
    base = samples.get(BASELINE)
    for name, ms in samples.items():
        r = results[name]
        r.ms_median, r.ms_mean, r.ms_min = statistics.median(ms), statistics.fmean(ms), min(ms)
        r.ms_samples = [round(t, 3) for t in ms]
        if base is not None:
            r.ratio_median, ratios = _median_ratio(ms, base)
            r.ratios = [round(x, 4) for x in ratios]
            r.ratio_of_means = statistics.fmean(ms) / statistics.fmean(base)
    # Mutual Choice rows share one counter: fallbacks are per block, over both rows
    for name in samples:
        if name.startswith("mutual_choice"):
            steps_run = rounds * steps * sum(n.startswith("mutual_choice") for n in samples)
            results[name].mc_fallbacks, results[name].mc_fallback_steps = fallbacks, steps_run
    del runners
    gc.collect()
    return list(results.values())


# ---------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------


_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def _cpu_peak_bytes(run: Callable[[], None]) -> tuple[int, int]:
    """(peak above resting RSS, peak RSS) of one call, in bytes (Linux)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    rest = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run()
    peak = _status_kb("VmHWM")
    return (peak - rest) * 1024, peak * 1024


def measure_memory(
    row: Architecture, size: Size, device: str, warmup: int, dead_frac: float
) -> tuple[float, float]:
    """(step peak above resting state, absolute peak), in MB, measured in this process."""
    runner = StepRunner(row, size, device, dead_frac)
    for _ in range(max(warmup, 1)):
        runner()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        gc.collect()
        rest = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        above = peak - rest
    else:
        above, peak = _cpu_peak_bytes(runner)
    del runner
    gc.collect()
    return above / 2**20, peak / 2**20


def measure_memory_subprocess(
    name: str, size: Size, device: str, warmup: int, dead_frac: float, threads: int
) -> tuple[float, float]:
    """:func:`measure_memory` of row ``name`` in a fresh Python process."""
    probe = {
        "arch": name,
        "size": asdict(size),
        "device": device,
        "warmup": warmup,
        "dead_frac": dead_frac,
        "threads": threads,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_time", "--memory-probe", json.dumps(probe)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {name} failed:\n{proc.stderr}")
    above, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return above, peak


def _memory_probe(spec: str) -> None:
    probe = json.loads(spec)
    torch.set_num_threads(probe["threads"])
    above, peak = measure_memory(
        ROWS[probe["arch"]], Size(**probe["size"]), probe["device"], probe["warmup"],
        probe["dead_frac"],
    )  # fmt: skip
    print(json.dumps([above, peak]))


def measure_block_memory(
    results: list[RowResult], size: Size, device: str, warmup: int, in_process: bool
) -> None:
    """Fill ``peak_mb`` and ``peak_ratio`` of the rows that ran."""
    for r in results:
        if not r.ok:
            continue
        if device == "cpu" and not in_process:
            above, peak = measure_memory_subprocess(
                r.arch, size, device, warmup, r.dead_frac, torch.get_num_threads()
            )
        else:
            above, peak = measure_memory(ROWS[r.arch], size, device, warmup, r.dead_frac)
        r.peak_mb, r.peak_total_mb = above, peak
    base = next((r for r in results if r.arch == BASELINE), None)
    if base is not None and base.peak_mb > 0:
        for r in results:
            r.peak_ratio = r.peak_mb / base.peak_mb


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def _f(x: float, digits: int) -> str:
    return "" if math.isnan(x) else f"{x:.{digits}f}"


def block_markdown(results: list[RowResult]) -> str:
    """One block's table: every row, with its times, memory and FLOP bound."""
    r0 = results[0]
    lines = [
        f"**{r0.device}: N={r0.n_tokens}, d_in={r0.d_in}, d_sae={r0.d_sae}, k={r0.k}, "
        f"{r0.dead_frac:.0%} dead ({r0.n_dead} latents)**",
        "",
        "| arch | median ms | time × topk | peak MB | memory × topk | FLOP bound × topk "
        "| mean ms | ratio of means |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = r.arch
        if r.mc_fallbacks:
            name += f" (fallback {r.mc_fallbacks}/{r.mc_fallback_steps})"
        if not r.ok:
            lines.append(f"| {name} | {r.status} | | | | {r.flop_bound_ratio:.3f} | | |")
            continue
        lines.append(
            f"| {name} | {r.ms_median:.1f} | {r.ratio_median:.3f} | {_f(r.peak_mb, 1)} "
            f"| {_f(r.peak_ratio, 3)} | {r.flop_bound_ratio:.3f} | {r.ms_mean:.1f} "
            f"| {r.ratio_of_means:.3f} |"
        )
    return "\n".join(lines) + "\n"


def summary_markdown(results: list[RowResult]) -> str:
    """Every block side by side: time, memory and FLOP-bound ratios to ``topk`` per row."""
    blocks = list(dict.fromkeys((r.device, r.size, r.dead_frac) for r in results))
    first = {b: next(r for r in results if (r.device, r.size, r.dead_frac) == b) for b in blocks}
    header = "| arch |" + "".join(
        f" {d} N={first[b].n_tokens}, d_in={first[b].d_in}, d_sae={first[b].d_sae}, "
        f"k={first[b].k}, {f:.0%} dead: time / mem / bound |"
        for b in blocks
        for d, _, f in [b]
    )
    lines = [
        "Ratios to SAELens's dense TopK in the same run: time (median of same-round "
        "ratios) / peak memory above rest / FLOP bound.",
        "",
        header,
        "|---|" + "---:|" * len(blocks),
    ]
    for arch in dict.fromkeys(r.arch for r in results):
        cells = []
        for b in blocks:
            r = next(r for r in results if (r.device, r.size, r.dead_frac, r.arch) == (*b, arch))
            if r.ok:
                cells.append(
                    f"{r.ratio_median:.2f} / {_f(r.peak_ratio, 2) or '-'} / {r.flop_bound_ratio:.2f}"
                )
            else:
                cells.append(r.status.split(":")[0] + f" / - / {r.flop_bound_ratio:.2f}")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min_start": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def _block_key(device: str, size: str, dead_frac: float) -> str:
    return f"{device}/{size}/{dead_frac:g}"


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)  # an interrupted write never leaves half a file


def run_table(args: argparse.Namespace) -> int:
    """The step-time table: every block, its Markdown as it finishes, the JSON after each."""
    table = QUICK_SIZES if args.quick else SIZES
    sizes = [table[s.strip()] for s in args.sizes.split(",") if s.strip()]
    dead_fracs = [float(x) for x in args.dead_fracs.split(",") if x.strip()]
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (2 if args.quick else 1)
    names = [a.strip() for a in args.archs.split(",") if a.strip()]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown architecture(s) {unknown}; choose from {list(ROWS)}")
    rows = {n: ROWS[n] for n in names}
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]

    settings = {
        "rounds": rounds,
        "warmup": warmup,
        "steps_per_sample": steps,
        "quick": args.quick,
        "archs": names,
        "memory": None
        if args.no_memory
        else "cuda max_memory_allocated / cpu VmHWM above resting RSS",
        "flop_bound": "(E + 10 d_in (kN + aux pairs)) / (6E, or 9E with dead latents), "
        "E = 2 N d_in d_sae",
    }
    env = environment()
    payload: dict[str, Any] = {
        "benchmark": "step_time",
        "environment": env,
        "settings": settings,
        "blocks": [],
        "results": [],
    }
    done: dict[str, dict[str, Any]] = {}
    if args.resume and args.json is not None and args.json.exists():
        old = json.loads(args.json.read_text())
        if old.get("settings") == settings:
            done = {b["key"]: b for b in old.get("blocks", [])}
            payload["environment"] = {**old.get("environment", {}), "resumed": env}
        else:
            print("# --resume: settings differ from the JSON's; measuring every block", flush=True)
    print(f"# step time, {env}", flush=True)
    results: list[RowResult] = []
    blocks: list[dict[str, Any]] = []
    for device, size, dead_frac in itertools.product(devices, sizes, dead_fracs):
        key = _block_key(device, size.name, dead_frac)
        if key in done:
            block = done[key]
            rs = [RowResult(**r) for r in block["results"]]  # json keeps NaN as NaN
            print(f"## {key}: from {args.json} (--resume)", flush=True)
        else:
            print(f"## {key}: {size}, {dead_frac:.0%} dead", flush=True)
            start, load = time.time(), os.getloadavg()[0]
            rs = time_block(rows, size, device, dead_frac, rounds, warmup, steps)
            if not args.no_memory:
                measure_block_memory(rs, size, device, warmup, in_process=args.quick)
            block = {
                "key": key,
                "seconds": round(time.time() - start, 1),
                "load_average_1min_before": round(load, 2),
                "load_average_1min_after": round(os.getloadavg()[0], 2),
                "results": [asdict(r) for r in rs],
            }
        print(block_markdown(rs), flush=True)
        print(
            f"(block {key}: {block['seconds']} s, load average "
            f"{block['load_average_1min_before']} -> {block['load_average_1min_after']})\n",
            flush=True,
        )
        results += rs
        blocks.append(block)
        if args.json is not None:
            payload["blocks"] = blocks
            payload["results"] = [asdict(r) for r in results]
            _write_json(args.json, payload)
    env["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(summary_markdown(results))
    if args.json is not None:
        _write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------
# crossover
# ---------------------------------------------------------------------------


GRID = {
    "d_in": (32, 64, 128, 256, 768),
    "d_sae": (128, 256, 512, 1024, 2048, 4096, 8192),
    "n_tokens": (512, 2048),
    "k": (8, 32),
}
QUICK_GRID = {"d_in": (16, 32), "d_sae": (64, 128), "n_tokens": (64,), "k": (4,)}


@dataclass
class CrossoverPoint:
    n_tokens: int
    d_in: int
    d_sae: int
    k: int
    arch: str
    steps_per_sample: int
    dense_ms: float
    sparse_ms: float
    sparse_over_dense: float  # median of the same-round ratios
    ratios: list[float]


def crossover_point(
    size: Size, device: str, rounds: int, warmup: int, min_sample_s: float
) -> list[CrossoverPoint]:
    """Dense and sparse steps of :data:`CROSSOVER_ARCHS` at ``size``, interleaved."""
    runners = {
        (arch, impl): StepRunner(ROWS[f"{arch}_{impl}"], size, device, 0.0)
        for arch in CROSSOVER_ARCHS
        for impl in STEP_IMPLEMENTATIONS
    }
    steps = 1
    for runner in runners.values():
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            runner()
        _sync(device)
        per_step = (time.perf_counter() - start) / max(warmup, 1)
        # the same number of steps for all four, sized on the slowest
        steps = max(steps, min(200, math.ceil(min_sample_s / max(per_step, 1e-6))))
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            samples[key].append(_ms_per_step(runner, steps, device))
    points = []
    for arch in CROSSOVER_ARCHS:
        dense, sparse = samples[(arch, "dense")], samples[(arch, "sparse")]
        ratio, ratios = _median_ratio(sparse, dense)
        points.append(
            CrossoverPoint(
                n_tokens=size.n_tokens,
                d_in=size.d_in,
                d_sae=size.d_sae,
                k=size.k,
                arch=arch,
                steps_per_sample=steps,
                dense_ms=statistics.median(dense),
                sparse_ms=statistics.median(sparse),
                sparse_over_dense=ratio,
                ratios=[round(x, 4) for x in ratios],
            )
        )
    return points


def best_rule(points: list[CrossoverPoint]) -> tuple[int, int, float]:
    """(X, Y, loss): the rule ``d_sae >= X and d_in >= Y`` that loses the least time.

    The loss of a rule is the sum over points of log(chosen / faster), the
    chosen step's time over the faster one's (0 where it picks the faster).
    Ties go to the smallest thresholds.
    """
    d_saes = [*sorted({p.d_sae for p in points}), math.inf]
    d_ins = [*sorted({p.d_in for p in points}), math.inf]

    def loss(x: float, y: float) -> float:
        total = 0.0
        for p in points:
            sparse = p.d_sae >= x and p.d_in >= y
            total += max(0.0, math.log(p.sparse_over_dense) * (1 if sparse else -1))
        return total

    best = min(((loss(x, y), x, y) for x in d_saes for y in d_ins), key=lambda t: t[0])
    return best[1], best[2], best[0]  # type: ignore[return-value]


def rule_loss(points: list[CrossoverPoint], rule: Callable[[int, int], bool]) -> float:
    """The loss (as :func:`best_rule`'s) of ``rule(d_in, d_sae)``."""
    total = 0.0
    for p in points:
        sign = 1 if rule(p.d_in, p.d_sae) else -1
        total += max(0.0, math.log(p.sparse_over_dense) * sign)
    return total


def crossover_markdown(points: list[CrossoverPoint]) -> str:
    """The d_in x d_sae matrix of median sparse / dense ratios, and the rules."""
    d_ins = sorted({p.d_in for p in points})
    d_saes = sorted({p.d_sae for p in points})
    lines = [
        "Sparse step time / dense step time (median over N, k and "
        f"{', '.join(CROSSOVER_ARCHS)} of the median same-round ratio); < 1: sparse faster.",
        "",
        "| d_in \\ d_sae | " + " | ".join(str(f) for f in d_saes) + " |",
        "|---|" + "---:|" * len(d_saes),
    ]
    for d_in in d_ins:
        cells = []
        for d_sae in d_saes:
            rs = [p.sparse_over_dense for p in points if (p.d_in, p.d_sae) == (d_in, d_sae)]
            cells.append(f"{statistics.median(rs):.2f}" if rs else "")
        lines.append(f"| {d_in} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| N | d_in | d_sae | k | arch | steps/sample | dense ms | sparse ms | sparse / dense |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.n_tokens} | {p.d_in} | {p.d_sae} | {p.k} | {p.arch} | {p.steps_per_sample} "
            f"| {p.dense_ms:.2f} | {p.sparse_ms:.2f} | {p.sparse_over_dense:.3f} |"
        )
    x, y, loss = best_rule(points)
    current = rule_loss(points, sparse_step_pays)
    lines += [
        "",
        f"Best rule over the grid: sparse when d_sae >= {x} and d_in >= {y} "
        f"(time lost, sum of log(chosen / faster): {loss:.3f}).",
        f"Current sparse_step_pays: time lost {current:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def run_crossover(args: argparse.Namespace) -> int:
    grid = dict(QUICK_GRID if args.quick else GRID)
    for key, option in (("d_in", "grid_d_in"), ("d_sae", "grid_d_sae"), ("n_tokens", "grid_n")):
        if getattr(args, option):
            grid[key] = tuple(int(v) for v in getattr(args, option).split(","))
    if args.grid_k:
        grid["k"] = tuple(int(v) for v in args.grid_k.split(","))
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    min_sample_s = args.min_sample_s
    if min_sample_s is None:
        min_sample_s = 0.0 if args.quick else 0.2
    device = "cpu" if args.device == "auto" else args.device
    env = environment()
    print(f"# crossover, {env}, grid {grid}", flush=True)
    points: list[CrossoverPoint] = []
    for d_in, d_sae, n_tokens, k in itertools.product(
        grid["d_in"], grid["d_sae"], grid["n_tokens"], grid["k"]
    ):
        if k >= d_sae:
            continue
        size = Size(f"x{n_tokens}_{d_in}_{d_sae}_{k}", n_tokens, d_in, d_sae, k)
        ps = crossover_point(size, device, rounds, warmup, min_sample_s)
        for p in ps:
            print(
                f"  N={n_tokens:5d} d_in={d_in:4d} d_sae={d_sae:5d} k={k:3d} {p.arch:<20} "
                f"dense {p.dense_ms:9.2f} ms  sparse {p.sparse_ms:9.2f} ms  "
                f"sparse/dense {p.sparse_over_dense:.3f}  (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        points += ps
    env["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print()
    print(crossover_markdown(points))
    if args.json is not None:
        x, y, loss = best_rule(points)
        payload = {
            "benchmark": "step_time_crossover",
            "environment": env,
            "settings": {
                "grid": grid,
                "rounds": rounds,
                "warmup": warmup,
                "min_sample_s": min_sample_s,
                "archs": list(CROSSOVER_ARCHS),
                "quick": args.quick,
            },
            "best_rule": {"d_sae_min": x, "d_in_min": y, "time_lost": loss},
            "current_rule_time_lost": rule_loss(points, sparse_step_pays),
            "results": [asdict(p) for p in points],
        }
        _write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1,2", help="comma-separated: 1, 2 (default both)")
    parser.add_argument(
        "--dead-fracs",
        default=",".join(f"{f:g}" for f in DEAD_FRACS),
        help="comma-separated fractions of latents marked dead (default 0,0.01)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="default 10 (3 quick; crossover 5, 2 quick)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per sample; default 1")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when available)"
    )
    parser.add_argument("--archs", default=",".join(ROWS), help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; seconds (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--resume", action="store_true", help="skip the blocks already in --json (same settings)"
    )
    parser.add_argument("--crossover", action="store_true", help="dense vs sparse over a grid")
    parser.add_argument("--grid-d-in", default=None, help="crossover: comma-separated d_in")
    parser.add_argument("--grid-d-sae", default=None, help="crossover: comma-separated d_sae")
    parser.add_argument("--grid-n", default=None, help="crossover: comma-separated N")
    parser.add_argument("--grid-k", default=None, help="crossover: comma-separated k")
    parser.add_argument(
        "--min-sample-s",
        type=float,
        default=None,
        help="crossover: seconds per sample at least (default 0.2; 0 with --quick)",
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The libraries' objects are permanent: moving them out of the collector's
    # reach makes the gc.collect() before each sample cost microseconds, not a
    # second (SAELens imports a lot).
    gc.collect()
    gc.freeze()
    if args.memory_probe is not None:
        _memory_probe(args.memory_probe)
        return 0
    if args.crossover:
        return run_crossover(args)
    return run_table(args)


if __name__ == "__main__":
    raise SystemExit(main())
