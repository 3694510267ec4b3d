"""Time a full training step of each architecture against SAELens's TopK.

Issue 6: a Mutual / Feature Choice training step should cost no more than a
TopK one. This script measures it.

What one step is (``--mode step``, the default): exactly what SAELens's
``SAETrainer._train_step`` does with the SAE, minus its logging bookkeeping::

    out = sae.training_forward_pass(TrainStepInput(sae_in, {}, dead_neuron_mask,
                                                   n_training_steps, is_logging_step=False))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    adam.step()
    adam.zero_grad()

``is_logging_step`` stays ``False``: the production hot path, where the
choice SAEs compute no metrics. Each SAE keeps its own step counter, so the
scheduled work (the Zipf refit every ``zipf_refit_every`` steps, the
finiteness check every ``check_finite_every``) happens as often as in real
training.

Architectures (all float32, ``rescale_acts_by_decoder_norm=True`` as TopK's
default, same seed, same ``sae_in`` and same ``dead_neuron_mask``):

- ``topk``: SAELens ``TopKTrainingSAE`` (aux_k loss on the dead latents).
- ``batchtopk``: SAELens ``BatchTopKTrainingSAE`` (same aux loss).
- ``mutual_choice``: ``MutualChoiceTrainingSAE`` with its default ``aux_zipf``.
- ``feature_choice_uniform`` / ``feature_choice_zipf``:
  ``FeatureChoiceTrainingSAE``, ``aux_loss="none"`` (its default).

``dead_neuron_mask`` marks a fixed random ``--dead-frac`` of the latents
(default 1%), so every architecture with an aux loss pays for it, as in real
training once a few latents have died. With ``--dead-frac 0`` SAELens's TopK
skips its aux loss entirely (it reads the dead count back and returns early),
while ``aux_zipf`` still runs whenever latents are under-used.

Timing: after ``--warmup`` untimed steps per architecture, the architectures
take turns (A B C D E, A B C D E, ...) for ``--rounds`` rounds; each sample is
``--steps`` consecutive steps of one architecture. Reported per architecture:
the median time per step, and the median over rounds of the ratio to ``topk``
*in the same round* (so slow drift of the machine's load cancels). Compare
ratios, not milliseconds, across machines. On CUDA every sample is bracketed
by ``torch.cuda.synchronize()``.

Medians hide work scheduled every few steps (the ``aux_zipf`` refit runs
every 10 steps). The default 10 rounds of 1 step cover exactly one refit per
architecture, so the table also gives the mean time per step and the ratio
of means, which include it amortised.

Peak memory, reported as the step's peak *above* the resting state (model,
gradients-free parameters, Adam state and the inputs, which are nearly the
same for every architecture), so that the ratio compares what the step itself
allocates:

- CUDA: ``torch.cuda.max_memory_allocated()`` during one step (after
  ``reset_peak_memory_stats``) minus ``torch.cuda.memory_allocated()`` before it.
- CPU: the process's resident-set high-water mark. Each architecture runs in a
  fresh subprocess (so no other model or freed-but-cached memory is resident):
  it builds the SAE, runs the warm-up steps (Adam's state now exists), sets
  glibc's mmap threshold to 64 KiB (``mallopt``) and trims the heap so freed
  tensors go back to the OS, reads ``VmRSS``, resets ``VmHWM`` through
  ``/proc/self/clear_refs``, runs one step and reads ``VmHWM``. The
  difference is the step's peak, as the kernel saw it (torch's CPU allocator
  does not cache, so this is every tensor the step held at once, plus a little
  allocator slack). ``tracemalloc`` would see none of torch's memory.
  ``--quick`` measures in-process instead (same recipe, no fresh process), to
  stay within seconds.

``--mode allocation`` times only the selection on a fixed ``hidden_pre``
(standard normal; the Feature Choice rows get it as the transposed view of a
contiguous (F, N) tensor, the layout ``FeatureChoiceTrainingSAE`` produces):
SAELens's ``TopK`` and ``BatchTopK`` activations, our ``MutualChoice`` and
``FeatureChoice`` modules (the latter rounding capacities afresh each call,
as in training). Same interleaving, ratios and memory recipe.

For ``mutual_choice`` the JSON also records ``mc_fallbacks``: how many of the
timed steps the candidate shortcut (``method="candidates"``, the CPU default)
had to widen its pool because some token had every candidate chosen.

Sizes: ``1`` = N=4096 tokens, d_in=768, d_sae=16384, k=32;
``2`` = N=1024, d_in=512, d_sae=65536, k=16; ``--quick`` uses tiny versions.

Commands (from the repository root)::

    python benchmarks/step_time.py                              # sizes 1 and 2, CPU (and CUDA if present)
    python benchmarks/step_time.py --json step_time.json        # also write JSON
    python benchmarks/step_time.py --sizes 1 --rounds 9         # one size, more rounds
    python benchmarks/step_time.py --mode allocation            # selection only
    python benchmarks/step_time.py --device cuda                # only CUDA
    python benchmarks/step_time.py --quick --json /tmp/q.json   # seconds; the CI smoke test

Run it on a quiet machine: other processes on the cores make the
milliseconds meaningless and blur the ratios (the JSON records the load
average before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import (
    BatchTopK,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopK, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_choice import allocation
from sae_lens_choice.inference import FeatureChoice, MutualChoice
from sae_lens_choice.training import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)


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
ARCHS = ("topk", "batchtopk", "mutual_choice", "feature_choice_uniform", "feature_choice_zipf")
BASELINE = "topk"
SEED = 0


# ---------------------------------------------------------------------------
# what is timed
# ---------------------------------------------------------------------------


def build_sae(arch: str, size: Size, device: str) -> torch.nn.Module:
    torch.manual_seed(SEED)  # same initial weights wherever the shapes agree
    common: dict[str, Any] = {"d_in": size.d_in, "d_sae": size.d_sae, "device": device}
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=size.k, **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=size.k, **common))
    if arch == "mutual_choice":
        return MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(k=size.k, **common))
    if arch.startswith("feature_choice_"):
        capacity = arch.removeprefix("feature_choice_")
        cfg = FeatureChoiceTrainingSAEConfig(k=size.k, capacity=capacity, **common)  # type: ignore[arg-type]
        return FeatureChoiceTrainingSAE(cfg)
    raise ValueError(f"unknown architecture {arch!r}")


def make_inputs(size: Size, device: str, dead_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED + 1)
    sae_in = torch.randn(size.n_tokens, size.d_in, generator=gen)  # (N, d_in)
    n_dead = round(dead_frac * size.d_sae)
    dead = torch.zeros(size.d_sae, dtype=torch.bool)  # (F,)
    dead[torch.randperm(size.d_sae, generator=gen)[:n_dead]] = True
    return sae_in.to(device), dead.to(device)


class StepRunner:
    """One architecture's SAE, optimizer and step counter."""

    def __init__(self, arch: str, size: Size, device: str, dead_frac: float):
        self.arch = arch
        self.sae = build_sae(arch, size, device)
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


class AllocationRunner:
    """One architecture's activation (selection only) on a fixed hidden_pre."""

    def __init__(self, arch: str, size: Size, device: str):
        self.arch = arch
        gen = torch.Generator().manual_seed(SEED + 2)
        hidden_pre_t = torch.randn(size.d_sae, size.n_tokens, generator=gen).to(device)  # (F, N)
        if arch.startswith("feature_choice_"):
            # the layout FeatureChoiceTrainingSAE.compute_hidden_pre returns
            self.hidden_pre = hidden_pre_t.t()  # (N, F) view
            capacity = arch.removeprefix("feature_choice_")
            fc = FeatureChoice(size.k, size.d_sae, capacity, validate=False)  # type: ignore[arg-type]
            fc.generator = torch.Generator(device=device).manual_seed(SEED)
            self.fn: Callable[[torch.Tensor], torch.Tensor] = fc
        else:
            self.hidden_pre = hidden_pre_t.t().contiguous()  # (N, F), as sae_in @ W_enc
            if arch == "topk":
                self.fn = TopK(size.k)
            elif arch == "batchtopk":
                self.fn = BatchTopK(float(size.k))
            elif arch == "mutual_choice":
                self.fn = MutualChoice(size.k, validate=False)
            else:
                raise ValueError(f"unknown architecture {arch!r}")

    def __call__(self) -> None:
        with torch.no_grad():
            self.fn(self.hidden_pre)


def make_runner(mode: str, arch: str, size: Size, device: str, dead_frac: float):
    if mode == "step":
        return StepRunner(arch, size, device, dead_frac)
    return AllocationRunner(arch, size, device)


@contextlib.contextmanager
def count_mc_fallbacks() -> Iterator[list[int]]:
    """Count calls of the Mutual Choice fallback (the candidate pool was widened)."""
    counter = [0]
    name = "_widen_candidates"
    original = getattr(allocation, name, None)
    if original is None:  # an older sae_lens_choice: nothing to count
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
# timing
# ---------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class ArchResult:
    mode: str
    device: str
    size: str
    n_tokens: int
    d_in: int
    d_sae: int
    k: int
    arch: str
    ms_median: float
    ms_mean: float
    ms_min: float
    ms_samples: list[float]
    ratio_median: float = float("nan")
    ratio_of_means: float = float("nan")
    ratios: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    peak_ratio: float = float("nan")
    peak_total_mb: float = float("nan")
    mc_fallbacks: int | None = None
    mc_fallback_steps: int | None = None


def time_archs(
    mode: str,
    size: Size,
    device: str,
    archs: tuple[str, ...],
    rounds: int,
    warmup: int,
    steps: int,
    dead_frac: float,
) -> list[ArchResult]:
    runners = {a: make_runner(mode, a, size, device, dead_frac) for a in archs}
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    _sync(device)
    samples: dict[str, list[float]] = {a: [] for a in archs}
    fallbacks = 0
    with count_mc_fallbacks() as counter:
        for _ in range(rounds):
            for arch, runner in runners.items():
                before = counter[0]
                gc.collect()
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    runner()
                _sync(device)
                samples[arch].append((time.perf_counter() - start) / steps * 1e3)
                if arch == "mutual_choice":
                    fallbacks += counter[0] - before
    results = []
    for arch in archs:
        ms = samples[arch]
        ratios = [t / b for t, b in zip(ms, samples[BASELINE])] if BASELINE in archs else []
        r = ArchResult(
            mode=mode,
            device=device,
            size=size.name,
            n_tokens=size.n_tokens,
            d_in=size.d_in,
            d_sae=size.d_sae,
            k=size.k,
            arch=arch,
            ms_median=statistics.median(ms),
            ms_mean=statistics.fmean(ms),
            ms_min=min(ms),
            ms_samples=[round(t, 3) for t in ms],
            ratio_median=statistics.median(ratios) if ratios else float("nan"),
            ratio_of_means=statistics.fmean(ms) / statistics.fmean(samples[BASELINE])
            if BASELINE in archs
            else float("nan"),
            ratios=[round(x, 4) for x in ratios],
        )
        if arch == "mutual_choice":
            r.mc_fallbacks, r.mc_fallback_steps = fallbacks, rounds * steps
        results.append(r)
    del runners
    gc.collect()
    return results


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
    mode: str, arch: str, size: Size, device: str, warmup: int, dead_frac: float
) -> tuple[float, float]:
    """(step peak above resting state, absolute peak), in MB, measured in this process."""
    runner = make_runner(mode, arch, size, device, dead_frac)
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
    mode: str, arch: str, size: Size, device: str, warmup: int, dead_frac: float, threads: int
) -> tuple[float, float]:
    probe = {
        "mode": mode,
        "arch": arch,
        "size": asdict(size),
        "device": device,
        "warmup": warmup,
        "dead_frac": dead_frac,
        "threads": threads,
    }
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-probe", json.dumps(probe)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe for {arch} failed:\n{proc.stderr}")
    above, peak = json.loads(proc.stdout.strip().splitlines()[-1])
    return above, peak


def _memory_probe(spec: str) -> None:
    probe = json.loads(spec)
    torch.set_num_threads(probe["threads"])
    size = Size(**probe["size"])
    above, peak = measure_memory(
        probe["mode"], probe["arch"], size, probe["device"], probe["warmup"], probe["dead_frac"]
    )
    print(json.dumps([above, peak]))


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------


def markdown(results: list[ArchResult]) -> str:
    lines: list[str] = []
    groups: dict[tuple[str, str, str], list[ArchResult]] = {}
    for r in results:
        groups.setdefault((r.mode, r.device, r.size), []).append(r)
    for (mode, device, _), rs in groups.items():
        r0 = rs[0]
        lines += [
            f"**{mode}, {device}: N={r0.n_tokens}, d_in={r0.d_in}, d_sae={r0.d_sae}, k={r0.k}**",
            "",
            "| arch | median ms | median ratio to topk | peak MB | ratio "
            "| mean ms | ratio of means |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rs:
            extra = ""
            if r.mc_fallbacks is not None:
                extra = f" (fallback {r.mc_fallbacks}/{r.mc_fallback_steps})"
            lines.append(
                f"| {r.arch}{extra} | {r.ms_median:.1f} | {r.ratio_median:.3f} "
                f"| {r.peak_mb:.1f} | {r.peak_ratio:.3f} | {r.ms_mean:.1f} | {r.ratio_of_means:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("step", "allocation"), default="step")
    parser.add_argument("--sizes", default="1,2", help="comma-separated: 1, 2 (default both)")
    parser.add_argument("--rounds", type=int, default=None, help="default 10 (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="steps per sample; default 1")
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, or auto (cpu, plus cuda when available)",
    )
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset")
    parser.add_argument("--dead-frac", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes; seconds (CI smoke)")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
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

    table = QUICK_SIZES if args.quick else SIZES
    sizes = [table[s.strip()] for s in args.sizes.split(",") if s.strip()]
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (2 if args.quick else 1)
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    if BASELINE not in archs:
        archs = (BASELINE, *archs)
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]

    env = environment()
    print(f"# {args.mode} time, {env}", flush=True)
    results: list[ArchResult] = []
    for device in devices:
        for size in sizes:
            print(f"## {device}, size {size.name}: {size}", flush=True)
            rs = time_archs(args.mode, size, device, archs, rounds, warmup, steps, args.dead_frac)
            if not args.no_memory:
                for r in rs:
                    if device == "cpu" and not args.quick:
                        above, peak = measure_memory_subprocess(
                            args.mode,
                            r.arch,
                            size,
                            device,
                            warmup,
                            args.dead_frac,
                            torch.get_num_threads(),
                        )
                    else:
                        above, peak = measure_memory(
                            args.mode, r.arch, size, device, warmup, args.dead_frac
                        )
                    r.peak_mb, r.peak_total_mb = above, peak
                base = next(r for r in rs if r.arch == BASELINE)
                for r in rs:
                    r.peak_ratio = r.peak_mb / base.peak_mb if base.peak_mb > 0 else float("nan")
            partial = markdown(rs)
            print(partial, flush=True)
            results += rs
    env["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(markdown(results))
    if args.json is not None:
        payload = {
            "benchmark": "step_time",
            "mode": args.mode,
            "environment": env,
            "settings": {
                "rounds": rounds,
                "warmup": warmup,
                "steps_per_sample": steps,
                "dead_frac": args.dead_frac,
                "quick": args.quick,
                "memory": "cuda max_memory_allocated / cpu VmHWM above resting RSS",
            },
            "results": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
