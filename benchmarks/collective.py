"""Cost of the exact data-parallel selection: bytes and time of the collective per step.

R CPU processes (gloo on 127.0.0.1, one thread each) hold N / R tokens of one
batch of random pre-activations (float32). Each step every rank runs the exact
distributed selection (:mod:`sae_lens_choice.distributed`) for Mutual Choice
and for Feature Choice with Zipf capacities, with the default candidate round
(``"candidates"``, what ``"auto"`` picks on CPU) and with the full round
(``"full"``, what it picks on accelerators). Reported per step (median over
steps, slowest rank):

- ``select ms``: the whole distributed selection on the rank (local top-k,
  all-gather, threshold, assembly);
- ``gather ms``: wall time inside the all-gather(s) (includes waiting for the
  slowest rank to arrive);
- ``raw gather ms``: a bare all-gather of the same number of values after a
  barrier: the transport alone;
- ``sent KiB`` / ``received KiB``: per rank per step; ``rounds``: all-gathers
  per step (2 when the candidate round fell back);
- ``local ms``: the single-process rule on the rank's own shard (what the rank
  would do alone: not exact globally);
- ``single-process ms``: the single-process rule on the whole batch in one
  process (the reference the distributed result equals).

The machine's other load skews CPU timings: the 1-minute load average is
recorded. Then an estimate (no measurement) of the all-gather for 8 GPUs at
N = 131,072, d_sae = 2^20, k = 32, from the exact volumes the module sends
(:func:`~sae_lens_choice.distributed.mutual_choice_volume`,
:func:`~sae_lens_choice.distributed.feature_choice_volume`), for a ring
all-gather at NVLink (450 GB/s per GPU) and 100 Gb/s Ethernet (12.5 GB/s):
time = (R - 1) * bytes per rank / bandwidth, latency ignored.

Commands (from the repository root)::

    python -m benchmarks.collective                    # N=4096, F=16384, k=32 at 2 and 4 ranks
    python -m benchmarks.collective --quick            # tiny, a few seconds
    python -m benchmarks.collective --json out.json    # also write the results as JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae_lens_choice.allocation import (
    capacity_bounds,
    feature_choice_pairs,
    mutual_choice_pairs,
    plan_feature_choice,
    round_capacities,
    rounding_offset,
    zipf_capacities,
)
from sae_lens_choice.distributed import (
    CollectiveStats,
    feature_choice_pairs_distributed,
    feature_choice_volume,
    mutual_choice_pairs_distributed,
    mutual_choice_volume,
)

NVLINK_BYTES_S = 450e9
ETHERNET_BYTES_S = 100e9 / 8
# all_gather_single replaces all_gather_into_tensor in recent torch versions
ALL_GATHER: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Row:
    ranks: int
    rule: str  # "mutual_choice" / "feature_choice zipf"
    method: str  # "candidates" / "full"
    select_ms: float
    gather_ms: float
    raw_gather_ms: float
    sent_kib: float
    received_kib: float
    rounds: float
    fallbacks: int
    local_ms: float
    single_process_ms: float = float("nan")
    select_ms_per_rank: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn: Callable[[], Any], barrier: bool) -> float:
    if barrier:
        dist.barrier()  # start together, so a step's time is not another rank's lag
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    try:
        n_total, d_sae, k = args.tokens, args.d_sae, args.k
        sizes = [n_total // world + (r < n_total % world) for r in range(world)]
        n_local = sizes[rank]
        gen = torch.Generator().manual_seed(1000 + rank)
        # (F, N_r) contiguous, used as its (N_r, F) transpose: the layout the
        # Feature Choice training SAE produces (Mutual Choice gets a copy).
        hidden_pre_t = torch.randn(d_sae, n_local, generator=gen)
        hidden_pre_fc = hidden_pre_t.t()  # (N_r, F) view
        hidden_pre = hidden_pre_fc.contiguous()  # (N_r, F)
        expected = zipf_capacities(n_total, d_sae, k)
        plan = plan_feature_choice(capacity_bounds(expected, n_total), n_total)
        # the rank alone: its own capacities for its own N_r tokens
        local_expected = zipf_capacities(n_local, d_sae, k)
        local_plan = plan_feature_choice(capacity_bounds(local_expected, n_local), n_local)
        step = [0]

        def caps(c: torch.Tensor) -> torch.Tensor:
            # identical on every rank: the offset depends on the step only
            step[0] += 1
            return round_capacities(c, offset=rounding_offset(step[0]))

        def task(rule: str, method: str, stats: CollectiveStats) -> dict[str, Callable[[], Any]]:
            """The three timed things of one row: distributed, raw all-gather, local."""
            if rule == "mutual_choice":
                per_round = mutual_choice_volume(k, sizes, d_sae, method=method)  # type: ignore[arg-type]
            else:
                per_round = feature_choice_volume(plan, sizes, method=method)  # type: ignore[arg-type]
            block, out = torch.randn(per_round), torch.empty(world * per_round)
            if rule == "mutual_choice":
                return {
                    "select": lambda: mutual_choice_pairs_distributed(
                        hidden_pre,
                        k,
                        rank_sizes=sizes,
                        method=method,  # type: ignore[arg-type]
                        validate=False,
                        stats=stats,
                    ),
                    "raw_gather": lambda: ALL_GATHER(out, block),
                    "local": lambda: mutual_choice_pairs(hidden_pre, k, validate=False),
                }
            return {
                "select": lambda: feature_choice_pairs_distributed(
                    hidden_pre_fc,
                    caps(expected),
                    plan=plan,
                    rank_sizes=sizes,
                    method=method,  # type: ignore[arg-type]
                    validate=False,
                    stats=stats,
                ),
                "raw_gather": lambda: ALL_GATHER(out, block),
                "local": lambda: feature_choice_pairs(
                    hidden_pre_fc, caps(local_expected), plan=local_plan, validate=False
                ),
            }

        combos = [
            (rule, method)
            for rule in ("mutual_choice", "feature_choice zipf")
            for method in ("candidates", "full")
        ]
        stats = {c: CollectiveStats() for c in combos}
        tasks = {c: task(*c, stats[c]) for c in combos}
        for c in combos:  # warm-up (allocator, first-touch pages), not counted
            for name, fn in tasks[c].items():
                _timed(fn, barrier=name != "local")
            stats[c] = CollectiveStats()
            tasks[c] = task(*c, stats[c])
        # the rows take turns, step after step, so that load from other processes
        # on a shared machine falls on all of them alike
        times: dict[tuple[str, str], dict[str, list[float]]] = {
            c: {name: [] for name in tasks[c]} for c in combos
        }
        for _ in range(args.steps):
            for c in combos:
                for name, fn in tasks[c].items():
                    times[c][name].append(_timed(fn, barrier=name != "local"))
        rows = []
        for c in combos:
            st, calls = stats[c], stats[c].selections
            ms = {name: 1e3 * statistics.median(ts) for name, ts in times[c].items()}
            rows.append(
                {
                    "rule": c[0],
                    "method": c[1],
                    "select_ms": ms["select"],
                    "gather_ms": 1e3 * st.seconds / calls,
                    "raw_gather_ms": ms["raw_gather"],
                    "sent_kib": st.bytes_sent / calls / 1024,
                    "received_kib": st.bytes_received / calls / 1024,
                    "rounds": st.rounds / calls,
                    "fallbacks": st.fallbacks,
                    "local_ms": ms["local"],
                }
            )
        results.put((rank, rows))
    finally:
        dist.destroy_process_group()


def _single_process_ms(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(1)
    n_total, d_sae, k = args.tokens, args.d_sae, args.k
    hidden_pre_t = torch.randn(d_sae, n_total, generator=torch.Generator().manual_seed(0))
    hidden_pre_fc = hidden_pre_t.t()
    hidden_pre = hidden_pre_fc.contiguous()
    expected = zipf_capacities(n_total, d_sae, k)
    plan = plan_feature_choice(capacity_bounds(expected, n_total), n_total)
    caps = round_capacities(expected, offset=0.5)
    fns = {
        "mutual_choice": lambda: mutual_choice_pairs(hidden_pre, k, validate=False),
        "feature_choice zipf": lambda: feature_choice_pairs(
            hidden_pre_fc, caps, plan=plan, validate=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.steps):
        for name, fn in fns.items():
            times[name].append(_timed(fn, barrier=False))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(args: argparse.Namespace) -> list[Row]:
    # fork: the ranks inherit the imported modules (no re-import per process);
    # the parent has run no torch work yet, so forking is safe
    ctx = mp.get_context("fork")
    rows: list[Row] = []
    for world in args.ranks:
        print(f"{world} ranks: N={args.tokens} total, F={args.d_sae}, k={args.k}", flush=True)
        results = ctx.Queue()
        port = _free_port()
        procs = [
            ctx.Process(target=_rank_main, args=(r, world, port, args, results))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        per_rank = dict(results.get(timeout=3600) for _ in range(world))
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"a rank exited with code {p.exitcode}")
        for i, first in enumerate(per_rank[0]):
            cells = [per_rank[r][i] for r in range(world)]
            row = Row(
                ranks=world,
                rule=first["rule"],
                method=first["method"],
                select_ms=max(c["select_ms"] for c in cells),
                gather_ms=max(c["gather_ms"] for c in cells),
                raw_gather_ms=max(c["raw_gather_ms"] for c in cells),
                sent_kib=max(c["sent_kib"] for c in cells),
                received_kib=max(c["received_kib"] for c in cells),
                rounds=max(c["rounds"] for c in cells),
                fallbacks=max(c["fallbacks"] for c in cells),
                local_ms=max(c["local_ms"] for c in cells),
                select_ms_per_rank=[c["select_ms"] for c in cells],
            )
            rows.append(row)
    single = _single_process_ms(args)
    for row in rows:
        row.single_process_ms = single[row.rule]
    return rows


def estimate(
    n_tokens: int = 131_072, d_sae: int = 2**20, k: float = 32, ranks: int = 8
) -> list[dict[str, Any]]:
    """All-gather volume and time per step for ``ranks`` GPUs (no measurement)."""
    sizes = [n_tokens // ranks] * ranks
    expected = zipf_capacities(n_tokens, d_sae, k)
    plan = plan_feature_choice(capacity_bounds(expected, n_tokens), n_tokens)
    out = []
    for rule, method in [
        ("mutual_choice", "candidates"),
        ("mutual_choice", "full"),
        ("feature_choice zipf", "candidates"),
        ("feature_choice zipf", "full"),
    ]:
        if rule == "mutual_choice":
            values = mutual_choice_volume(k, sizes, d_sae, method=method)  # type: ignore[arg-type]
        else:
            values = feature_choice_volume(plan, sizes, method=method)  # type: ignore[arg-type]
        for dtype, size in (("bfloat16", 2), ("float32", 4)):
            received = (ranks - 1) * values * size
            out.append(
                {
                    "rule": rule,
                    "method": method,
                    "dtype": dtype,
                    "values_per_rank": values,
                    "sent_mb_per_rank": values * size / 1e6,
                    "received_mb_per_rank": received / 1e6,
                    "nvlink_ms": 1e3 * received / NVLINK_BYTES_S,
                    "ethernet_ms": 1e3 * received / ETHERNET_BYTES_S,
                }
            )
    return out


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"N={args.tokens} tokens in total, F={args.d_sae}, k={args.k}, float32, gloo on one "
        f"machine, 1 thread per rank, median of {args.steps} steps, slowest rank",
        "",
        "| ranks | rule | method | select ms | gather ms | raw gather ms | sent KiB | "
        "received KiB | rounds | local ms | single-process ms |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.ranks} | {r.rule} | {r.method} | {r.select_ms:.1f} | {r.gather_ms:.1f} | "
            f"{r.raw_gather_ms:.1f} | {r.sent_kib:.0f} | {r.received_kib:.0f} | {r.rounds:g} | "
            f"{r.local_ms:.1f} | {r.single_process_ms:.1f} |"
        )
    return "\n".join(lines)


def markdown_estimate(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Estimate, 8 GPUs, N=131,072 (16,384 per GPU), d_sae=2^20, k=32, ring all-gather:",
        "",
        "| rule | method | dtype | values sent / GPU | MB received / GPU | NVLink ms | "
        "100 Gb/s Ethernet ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rule']} | {r['method']} | {r['dtype']} | {r['values_per_rank']:,} | "
            f"{r['received_mb_per_rank']:.1f} | {r['nvlink_ms']:.3f} | {r['ethernet_ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, tokens over all ranks")
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="N=256, F=1024, k=8, 2 steps")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.d_sae, args.k, args.steps = 256, 1024, 8, 2
    if args.k == int(args.k):
        args.k = int(args.k)
    rows = run(args)
    table = markdown(rows, args)
    print(table)
    guess = estimate()
    print()
    print(markdown_estimate(guess))
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min": f"{os.getloadavg()[0]:.2f}",
    }
    print(f"\n{env}")
    if args.json is not None:
        payload = {
            "benchmark": "collective",
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "environment": env,
            "results": [asdict(r) for r in rows],
            "estimate_8_gpus": guess,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
