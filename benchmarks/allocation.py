"""Time the allocation rules against Token Choice (SAELens ``topk``) on one batch.

Every rule gets the same random pre-activations and is timed with
``torch.utils.benchmark`` (``blocked_autorange``; the rules take turns over a
few rounds and the median over all blocks is reported), with
``validate=False`` as the training SAEs call them, so the numbers are the
selection alone. Ratios are to ``token_choice`` measured in the same run on the
same machine: compare ratios, not milliseconds, across machines. The minimum
over blocks is reported too: on a shared machine it is the steadier estimate
of a rule's own cost, the median the more typical one.

Rows:

- ``token_choice``: each token's top k (the baseline, = SAELens ``TopK``).
- ``mutual_choice auto`` / ``flat``: top k*N of the whole matrix (``auto`` is the
  candidate shortcut on CPU and the flat top-k on accelerators).
- ``feature_choice uniform`` / ``zipf``: each latent's top m_j tokens, with the
  capacities rounded afresh each call (``round_capacities``, part of every
  training step) and a grouping plan. Input as the training SAE computes it:
  the transposed view of a contiguous (F, N) product. The ``(N, F) input`` row
  shows the cost of the transpose copy when the input is laid out (N, F), and
  ``no plan`` what the plan saves (one top-max(m_j) over every latent).
- SAELens's own ``TopK`` and ``BatchTopK`` activations, for reference.

Commands (from the repository root)::

    python benchmarks/allocation.py                 # N=4096, F=16384, k=32 and N=1024, F=4096, k=16
    python benchmarks/allocation.py --quick         # tiny size, a few seconds (CI smoke test)
    python benchmarks/allocation.py --json out.json # also write the results as JSON
    python benchmarks/allocation.py --threads 2     # as on the 2-core CI machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils.benchmark as tb
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.topk_sae import TopK

from sae_lens_choice.allocation import (
    capacity_bounds,
    feature_choice,
    mutual_choice,
    plan_feature_choice,
    round_capacities,
    token_choice,
    uniform_capacities,
    zipf_capacities,
)

FULL_SIZES = [(4096, 16384, 32), (1024, 4096, 16)]
QUICK_SIZES = [(256, 1024, 8)]
BASELINE = "token_choice"


@dataclass
class Result:
    n_tokens: int
    d_sae: int
    k: int
    rule: str
    ms_median: float
    ms_iqr: float
    ms_min: float
    n_blocks: int
    ratio_to_token_choice: float = float("nan")
    min_ratio_to_token_choice: float = float("nan")


def _cases(
    n_tokens: int, d_sae: int, k: int, device: torch.device, with_slow: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    # (F, N) contiguous, used as its (N, F) transpose: the layout the Feature
    # Choice training SAE produces. The (N, F) copy holds the same values.
    hidden_pre_t = torch.randn(d_sae, n_tokens, generator=gen).to(device)  # (F, N)
    hidden_pre_view = hidden_pre_t.t()  # (N, F), non-contiguous
    hidden_pre = hidden_pre_view.contiguous()  # (N, F)

    c_uniform = uniform_capacities(n_tokens, d_sae, k).to(device)
    c_zipf = zipf_capacities(n_tokens, d_sae, k, alpha=1.0, beta=0.0).to(device)
    plan_uniform = plan_feature_choice(capacity_bounds(c_uniform, n_tokens), n_tokens)
    plan_zipf = plan_feature_choice(capacity_bounds(c_zipf, n_tokens), n_tokens)
    cap_gen = torch.Generator().manual_seed(1)
    sae_lens_topk, sae_lens_batchtopk = TopK(k), BatchTopK(float(k))

    cases: dict[str, Callable[[], torch.Tensor]] = {
        BASELINE: lambda: token_choice(hidden_pre, k, validate=False),
        "mutual_choice auto": lambda: mutual_choice(hidden_pre, k, validate=False),
        "mutual_choice flat": lambda: mutual_choice(hidden_pre, k, method="flat", validate=False),
        "feature_choice uniform": lambda: feature_choice(
            hidden_pre_view,
            round_capacities(c_uniform, cap_gen),
            plan=plan_uniform,
            validate=False,
        ),
        "feature_choice zipf": lambda: feature_choice(
            hidden_pre_view, round_capacities(c_zipf, cap_gen), plan=plan_zipf, validate=False
        ),
        "feature_choice zipf, (N, F) input": lambda: feature_choice(
            hidden_pre, round_capacities(c_zipf, cap_gen), plan=plan_zipf, validate=False
        ),
    }
    if with_slow:
        cases["feature_choice zipf, no plan"] = lambda: feature_choice(
            hidden_pre_view, round_capacities(c_zipf, cap_gen), validate=False
        )
    cases["SAELens TopK"] = lambda: sae_lens_topk(hidden_pre)
    cases["SAELens BatchTopK"] = lambda: sae_lens_batchtopk(hidden_pre)
    return cases


def run(
    sizes: list[tuple[int, int, int]],
    device: torch.device,
    min_run_time: float,
    rounds: int,
    with_slow: bool,
) -> list[Result]:
    results: list[Result] = []
    for n_tokens, d_sae, k in sizes:
        print(f"N={n_tokens}, F={d_sae}, k={k}", flush=True)
        cases = _cases(n_tokens, d_sae, k, device, with_slow)
        times: dict[str, list[float]] = {rule: [] for rule in cases}
        for fn in cases.values():
            fn()  # warm-up: allocator, lazy init
        # Rules take turns, round after round, so that load from other processes
        # on a shared machine falls on all of them alike and the ratios stay fair.
        for _ in range(rounds):
            for rule, fn in cases.items():
                timer = tb.Timer(
                    stmt="fn()",
                    globals={"fn": fn},
                    num_threads=torch.get_num_threads(),
                    label=f"N={n_tokens}, F={d_sae}, k={k}",
                    description=rule,
                )
                times[rule] += timer.blocked_autorange(min_run_time=min_run_time / rounds).times
        size_results: list[Result] = []
        for rule, ts in times.items():
            t = torch.tensor(ts, dtype=torch.float64) * 1e3  # ms per call, one per block
            q1, median, q3 = (float(t.quantile(q)) for q in (0.25, 0.5, 0.75))
            fastest = float(t.min())
            size_results.append(Result(n_tokens, d_sae, k, rule, median, q3 - q1, fastest, len(ts)))
            print(
                f"  {rule:<36} {median:10.2f} ms  (min {fastest:.2f}, IQR {q3 - q1:.2f}, "
                f"{len(ts)} blocks)",
                flush=True,
            )
        base = next(r for r in size_results if r.rule == BASELINE)
        for r in size_results:
            r.ratio_to_token_choice = r.ms_median / base.ms_median
            r.min_ratio_to_token_choice = r.ms_min / base.ms_min
        results.extend(size_results)
    return results


def markdown(results: list[Result]) -> str:
    lines: list[str] = []
    sizes = sorted({(r.n_tokens, r.d_sae, r.k) for r in results}, reverse=True)
    for n_tokens, d_sae, k in sizes:
        lines += [
            f"**N={n_tokens}, F={d_sae}, k={k}**",
            "",
            "| rule | ms / call (median) | × token_choice | ms / call (min) | × token_choice (min) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in results:
            if (r.n_tokens, r.d_sae, r.k) == (n_tokens, d_sae, k):
                lines.append(
                    f"| {r.rule} | {r.ms_median:.2f} | {r.ratio_to_token_choice:.2f} "
                    f"| {r.ms_min:.2f} | {r.min_ratio_to_token_choice:.2f} |"
                )
        lines.append("")
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, str | int]:
    name = platform.processor() or platform.machine()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "torch": torch.__version__,
        "device": f"{device.type} ({name})",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # Other processes skew CPU timings (OpenMP threads wait for a free core):
        # record the load so a noisy run can be recognised.
        "load_average_1min": f"{os.getloadavg()[0]:.2f}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny size (CI smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per rule, over all rounds (default 3, or 0.1 with --quick)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each rule takes its turn (default 3)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    min_run_time = args.min_run_time or (0.1 if args.quick else 3.0)
    env = environment(device)
    print(", ".join(f"{key} {value}" for key, value in env.items()), flush=True)
    results = run(sizes, device, min_run_time, args.rounds, with_slow=not args.quick)
    print()
    print(markdown(results))
    if args.json is not None:
        payload = {"environment": env, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
