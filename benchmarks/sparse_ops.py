"""Time the candidate implementations of the sparse step's ops against their dense equivalents.

Each op of the step after the selection (:mod:`sae_lens_choice.sparse`) has
several torch implementations; this measures them on one batch of random
pairs (k per token on average, spread like a Mutual Choice selection) and the
dense matmul each replaces, so ``sparse.py`` can use the fastest:

- ``decode``: (N, d) = feature_acts @ W_dec from the pairs (the forward decode).
- ``grad_acts``: (P,) grad_out[i] . W_dec[j] per pair (decode backward, values).
- ``grad_W_dec``: (F, d) = feature_acts^T @ grad_out (decode backward, W_dec).
- ``grad_sae_in``: (N, d) = grad_pre @ W_enc^T (encoder backward, input).
- ``grad_W_enc``: (d, F) = sae_in^T @ grad_pre (encoder backward, W_enc).
- ``layout``: grouping the pairs by token and by latent (two sorts), once a step.

Then the composed training forward + backward (no optimizer), with
``rescale_acts_by_decoder_norm`` on (SAELens TopK's default), with 0% and 1%
dead latents (the aux loss's candidates, ``k_aux = d_in // 2``):

- ``SAELens TopK (dense)``: ``TopKTrainingSAE.training_forward_pass`` and
  ``loss.backward()``, SAELens's own dense step (its aux loss when latents are dead).
- ``sparse MC``: encoder forward without autograd, the Mutual Choice selection
  (:func:`~sae_lens_choice.allocation.mutual_choice_pairs`), the (N, F)
  pre-activations freed, then :func:`~sae_lens_choice.sparse.sparse_encode_decode`
  and the backward; the aux loss on the candidate columns
  (:func:`~sae_lens_choice.sparse.aux_candidate_reconstruction`).
- ``sparse MC, aux from pairs``: the same with the aux loss's pairs selected
  with the main ones (:func:`~sae_lens_choice.sparse.aux_topk_pairs`) and decoded
  by :func:`~sae_lens_choice.sparse.sparse_encode_decode`.
- ``sparse after selection``: the latter's part after the selection alone.
- ``encoder forward``: ``sae_in @ W_enc`` alone, the bound every step pays.

Timings: each candidate takes its turn round after round (so load from other
processes falls on all alike); the median over rounds is reported with the
minimum. Peak memory (``--memory``): the step's peak resident memory above the
resting state, as the kernel counts it (``VmHWM`` after resetting it, Linux),
measured in this process with glibc returning freed blocks.

Commands (from the repository root)::

    python -m benchmarks.sparse_ops                  # both sizes, 2 threads
    python -m benchmarks.sparse_ops --memory         # also peak memory of the steps
    python -m benchmarks.sparse_ops --parts steps    # the composed steps only
    python -m benchmarks.sparse_ops --quick          # tiny size (smoke test)
    python -m benchmarks.sparse_ops --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_lens_choice.allocation import ChoicePairs, mutual_choice_pairs
from sae_lens_choice.sparse import (
    PairLayout,
    aux_candidate_reconstruction,
    aux_topk_pairs,
    pair_dot,
    pair_layout,
    sparse_encode_decode,
)


@dataclass(frozen=True)
class Size:
    n_tokens: int
    d_in: int
    d_sae: int
    k: int

    @property
    def label(self) -> str:
        return f"N={self.n_tokens}, d_in={self.d_in}, F={self.d_sae}, k={self.k}"


FULL_SIZES = [Size(4096, 768, 16384, 32), Size(1024, 512, 65536, 16)]
QUICK_SIZES = [Size(256, 64, 1024, 8)]


@dataclass
class Result:
    size: str
    op: str
    candidate: str
    ms_median: float
    ms_min: float
    rounds: int
    ratio_to_dense: float = float("nan")
    peak_mb: float = float("nan")


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


@dataclass
class Inputs:
    x: torch.Tensor  # (N, d)
    sae_in: torch.Tensor  # (N, d)
    W_enc: torch.Tensor  # (d, F)
    b_enc: torch.Tensor  # (F,)
    W_dec: torch.Tensor  # (F, d)
    b_dec: torch.Tensor  # (d,)
    grad_out: torch.Tensor  # (N, d)
    token_idx: torch.Tensor  # (P,)
    latent_idx: torch.Tensor  # (P,)
    values: torch.Tensor  # (P,)
    layout: PairLayout
    dense_acts: torch.Tensor  # (N, F) the pairs' values, dense


def make_inputs(size: Size) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    n, d, f = size.n_tokens, size.d_in, size.d_sae
    W_dec = torch.randn(f, d, generator=gen) / d**0.5
    W_enc = W_dec.t().contiguous()
    b_enc = torch.zeros(f)
    b_dec = torch.zeros(d)
    x = torch.randn(n, d, generator=gen)
    # pairs as a Mutual Choice selection spreads them: about k per token, distinct
    n_pairs = size.k * n
    flat = torch.randperm(n * f, generator=gen)[:n_pairs]
    token_idx, latent_idx = flat // f, flat % f
    values = torch.rand(n_pairs, generator=gen) + 0.1
    layout = pair_layout(token_idx, latent_idx, values > 0, n, f)
    dense_acts = torch.zeros(n, f)
    dense_acts[token_idx, latent_idx] = values
    return Inputs(
        x=x,
        sae_in=x - b_dec,
        W_enc=W_enc,
        b_enc=b_enc,
        W_dec=W_dec,
        b_dec=b_dec,
        grad_out=torch.randn(n, d, generator=gen),
        token_idx=token_idx,
        latent_idx=latent_idx,
        values=values,
        layout=layout,
        dense_acts=dense_acts,
    )


# ---------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------


def _coo(inp: Inputs, weights: torch.Tensor) -> torch.Tensor:
    indices = torch.stack([inp.token_idx, inp.latent_idx])  # (2, P)
    shape = (inp.x.shape[0], inp.W_dec.shape[0])
    return torch.sparse_coo_tensor(indices, weights, shape, check_invariants=False).coalesce()


def _csr(inp: Inputs, weights: torch.Tensor) -> torch.Tensor:
    lay = inp.layout
    shape = (inp.x.shape[0], inp.W_dec.shape[0])
    return torch.sparse_csr_tensor(
        lay.token_crow,
        lay.token_gather,
        weights.index_select(0, lay.token_order),
        shape,
        check_invariants=False,
    )


def _embedding_bag(
    table: torch.Tensor, gather: torch.Tensor, crow: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return F.embedding_bag(gather, table, crow[:-1], mode="sum", per_sample_weights=weights)


def _index_add(
    table: torch.Tensor,
    rows_out: torch.Tensor,
    rows_in: torch.Tensor,
    weights: torch.Tensor,
    n_out: int,
    block: int = 8192,
) -> torch.Tensor:
    out = table.new_zeros(n_out, table.shape[1])
    for s in range(0, rows_in.shape[0], block):
        gathered = table.index_select(0, rows_in[s : s + block]) * weights[s : s + block, None]
        out.index_add_(0, rows_out[s : s + block], gathered)
    return out


def _pair_dot_blocks(
    a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block: int = 2048
) -> torch.Tensor:
    out = a.new_empty(rows.shape[0])
    for s in range(0, rows.shape[0], block):
        a_rows = a.index_select(0, rows[s : s + block])
        b_rows = b.index_select(0, cols[s : s + block])
        out[s : s + block] = (a_rows * b_rows).sum(-1)
    return out


def op_cases(inp: Inputs) -> dict[str, dict[str, Callable[[], Any]]]:
    """op -> candidate -> callable; each op's ``dense`` is the matmul it replaces."""
    lay = inp.layout
    n, f = inp.x.shape[0], inp.W_dec.shape[0]
    w_tok = inp.values.index_select(0, lay.token_order)  # weights in token order
    w_lat = inp.values.index_select(0, lay.latent_order)  # weights in latent order
    coo = _coo(inp, inp.values)
    csr = _csr(inp, inp.values)
    dense_grad_pre = inp.dense_acts  # any (N, F) matrix with the pairs' sparsity
    return {
        "decode": {
            "embedding_bag": lambda: _embedding_bag(
                inp.W_dec, lay.token_gather, lay.token_crow, w_tok
            ),
            "csr mm": lambda: csr @ inp.W_dec,
            "coo mm (coalesced)": lambda: torch.sparse.mm(coo, inp.W_dec),
            "coo build+coalesce+mm": lambda: torch.sparse.mm(_coo(inp, inp.values), inp.W_dec),
            "index_add blocks": lambda: _index_add(
                inp.W_dec, inp.token_idx, inp.latent_idx, inp.values, n
            ),
            "dense": lambda: inp.dense_acts @ inp.W_dec,
        },
        "grad_acts": {
            "sddmm (sampled_addmm)": lambda: pair_dot(
                inp.grad_out, inp.W_dec, lay.token_rows, lay.token_gather, lay.token_crow
            ),
            "gather blocks": lambda: _pair_dot_blocks(
                inp.grad_out, inp.W_dec, inp.token_idx, inp.latent_idx
            ),
            "dense": lambda: inp.grad_out @ inp.W_dec.t(),
        },
        "grad_W_dec": {
            "embedding_bag": lambda: _embedding_bag(
                inp.grad_out, lay.latent_gather, lay.latent_crow, w_lat
            ),
            "coo^T mm": lambda: torch.sparse.mm(coo.t(), inp.grad_out),
            "dense": lambda: inp.dense_acts.t() @ inp.grad_out,
        },
        "grad_sae_in": {
            "transpose + embedding_bag": lambda: _embedding_bag(
                inp.W_enc.t().contiguous(), lay.token_gather, lay.token_crow, w_tok
            ),
            "W_enc @ coo^T": lambda: torch.mm(inp.W_enc, coo.t()).t(),
            "csr @ W_enc^T": lambda: csr @ inp.W_enc.t(),
            "dense": lambda: dense_grad_pre @ inp.W_enc.t(),
        },
        "grad_W_enc": {
            "embedding_bag + transpose": lambda: (
                _embedding_bag(inp.sae_in, lay.latent_gather, lay.latent_crow, w_lat)
                .t()
                .contiguous()
            ),
            "embedding_bag (F, d) only": lambda: _embedding_bag(
                inp.sae_in, lay.latent_gather, lay.latent_crow, w_lat
            ),
            "sae_in^T @ coo": lambda: torch.mm(inp.sae_in.t(), coo),
            "dense": lambda: inp.sae_in.t() @ dense_grad_pre,
        },
        "layout": {
            "pair_layout (2 sorts)": lambda: pair_layout(
                inp.token_idx, inp.latent_idx, inp.values > 0, n, f
            ),
        },
    }


# ---------------------------------------------------------------------------
# composed steps
# ---------------------------------------------------------------------------


class _Params:
    def __init__(self, inp: Inputs):
        self.W_enc = inp.W_enc.clone().requires_grad_()
        self.b_enc = inp.b_enc.clone().requires_grad_()
        self.W_dec = inp.W_dec.clone().requires_grad_()
        self.b_dec = inp.b_dec.clone().requires_grad_()

    def zero_grad(self) -> None:
        for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec):
            p.grad = None


def saelens_topk(inp: Inputs, k: int) -> TopKTrainingSAE:
    """SAELens's TopK training SAE (rescale on, its default) with the benchmark's weights."""
    d_sae, d_in = inp.W_dec.shape
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(inp, name))
    return sae


def dense_topk_step(sae: TopKTrainingSAE, x: torch.Tensor, dead: torch.Tensor | None) -> None:
    """SAELens TopK's training forward pass (aux loss on ``dead``) and backward, dense."""
    sae.zero_grad(set_to_none=True)
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    out.loss.backward()


def sparse_step(
    p: _Params,
    x: torch.Tensor,
    k: int,
    dead: torch.Tensor | None,
    *,
    pairs: ChoicePairs | None = None,
    aux_method: str = "columns",
) -> None:
    """Encoder forward without autograd, Mutual Choice selection, (N, F) freed, then the
    sparse path forward and backward, with the aux loss on ``dead`` decoded from its pairs
    (``aux_method="pairs"``, selected with the main pairs) or computed on the candidate
    columns (``"columns"``). With ``pairs`` given, only the part after the selection runs.
    """
    p.zero_grad()
    sae_in = x - p.b_dec
    k_aux = x.shape[-1] // 2
    aux = None
    if pairs is None:
        with torch.no_grad():
            norms = p.W_dec.norm(dim=-1)
            hidden_pre = (sae_in @ p.W_enc + p.b_enc) * norms  # (N, F), freed below
            pairs = mutual_choice_pairs(hidden_pre, k, validate=False)
            if dead is not None and aux_method == "pairs":
                aux = aux_topk_pairs(hidden_pre, dead, k_aux)
            del hidden_pre
    sae_out, _ = sparse_encode_decode(
        sae_in, p.W_enc, p.b_enc, p.W_dec, p.b_dec, pairs, rescale_acts_by_decoder_norm=True
    )
    loss = (sae_out - x).pow(2).sum(-1).mean()
    if dead is not None:
        if aux is not None:
            aux_pairs, kept = aux
            recons, _ = sparse_encode_decode(
                sae_in,
                p.W_enc,
                p.b_enc,
                p.W_dec,
                None,
                aux_pairs,
                rescale_acts_by_decoder_norm=True,
                kept=kept,
            )
        else:
            candidates = dead.nonzero().squeeze(1)
            recons = aux_candidate_reconstruction(
                sae_in,
                p.W_enc,
                p.b_enc,
                p.W_dec,
                candidates,
                k_aux,
                rescale_acts_by_decoder_norm=True,
            )
        scale = (dead.sum() / k_aux).clamp(max=1.0)
        loss = loss + scale * (recons - (x - sae_out).detach()).pow(2).sum(-1).mean()
    loss.backward()


def step_cases(inp: Inputs, k: int, dead_frac: float) -> dict[str, Callable[[], Any]]:
    d_sae = inp.W_dec.shape[0]
    dead: torch.Tensor | None = None
    if dead_frac > 0:
        dead = torch.zeros(d_sae, dtype=torch.bool)
        gen = torch.Generator().manual_seed(1)
        dead[torch.randperm(d_sae, generator=gen)[: round(dead_frac * d_sae)]] = True
    sae = saelens_topk(inp, k)
    p_sparse, p_after = _Params(inp), _Params(inp)
    with torch.no_grad():
        hidden_pre = (inp.sae_in @ inp.W_enc + inp.b_enc) * inp.W_dec.norm(dim=-1)
        pairs = mutual_choice_pairs(hidden_pre, k, validate=False)
        del hidden_pre
    cases: dict[str, Callable[[], Any]] = {
        "SAELens TopK (dense)": lambda: dense_topk_step(sae, inp.x, dead),
        "sparse MC": lambda: sparse_step(p_sparse, inp.x, k, dead),
    }
    if dead is not None:
        p_pairs = _Params(inp)
        cases["sparse MC, aux from pairs"] = lambda: sparse_step(
            p_pairs, inp.x, k, dead, aux_method="pairs"
        )
    else:
        cases["sparse after selection"] = lambda: sparse_step(p_after, inp.x, k, None, pairs=pairs)
        cases["encoder forward"] = lambda: inp.sae_in @ inp.W_enc
    return cases


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------


def time_cases(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """ms per call of each case, one sample per round; the cases take turns."""
    for fn in cases.values():
        fn()  # warm-up: allocator, lazy init
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


_M_MMAP_THRESHOLD = -3


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def peak_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory of one call above the resting state, MB (Linux; NaN elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # serve large blocks by mmap, so freed ones leave the resident set at once
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        gc.collect()
        libc.malloc_trim(0)
        rest = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    except (OSError, RuntimeError):
        return float("nan")
    fn()
    return (_status_kb("VmHWM") - rest) / 1024


def run(sizes: list[Size], rounds: int, memory: bool, parts: str = "all") -> list[Result]:
    results: list[Result] = []
    for size in sizes:
        print(size.label, flush=True)
        inp = make_inputs(size)
        ops = op_cases(inp) if parts in ("all", "ops") else {}
        for op, cases in ops.items():
            times = time_cases(cases, rounds)
            rows = [
                Result(size.label, op, name, statistics.median(ts), min(ts), len(ts))
                for name, ts in times.items()
            ]
            dense = next((r for r in rows if r.candidate == "dense"), None)
            for r in rows:
                if dense is not None:
                    r.ratio_to_dense = r.ms_median / dense.ms_median
                print(
                    f"  {op:<12} {r.candidate:<28} {r.ms_median:9.1f} ms (min {r.ms_min:.1f})"
                    f"  x dense {r.ratio_to_dense:.3f}",
                    flush=True,
                )
            results += rows
        for dead_frac in (0.0, 0.01) if parts in ("all", "steps") else ():
            cases = step_cases(inp, size.k, dead_frac)
            times = time_cases(cases, rounds)
            op = f"step, {dead_frac:.0%} dead"
            rows = [
                Result(size.label, op, name, statistics.median(ts), min(ts), len(ts))
                for name, ts in times.items()
            ]
            base = rows[0]
            for r in rows:
                r.ratio_to_dense = r.ms_median / base.ms_median
                if memory and r.candidate != "encoder forward":
                    r.peak_mb = peak_mb(cases[r.candidate])
                print(
                    f"  {op:<12} {r.candidate:<28} {r.ms_median:9.1f} ms (min {r.ms_min:.1f})"
                    f"  x SAELens TopK {r.ratio_to_dense:.3f}  peak {r.peak_mb:.0f} MB",
                    flush=True,
                )
            results += rows
        del inp, cases
        gc.collect()
    return results


def markdown(results: list[Result]) -> str:
    lines: list[str] = []
    for size in dict.fromkeys(r.size for r in results):
        lines += [
            f"**{size}**",
            "",
            "| op | candidate | ms (median) | ms (min) | × dense | peak MB |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in results:
            if r.size == size:
                lines.append(
                    f"| {r.op} | {r.candidate} | {r.ms_median:.1f} | {r.ms_min:.1f} "
                    f"| {r.ratio_to_dense:.3f} | {r.peak_mb:.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # other processes skew CPU timings: record the load
        "load_average_1min": f"{os.getloadavg()[0]:.2f}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny size (smoke test)")
    parser.add_argument("--rounds", type=int, default=5, help="turns per candidate (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--memory", action="store_true", help="also peak memory of the steps")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument(
        "--parts", choices=["all", "ops", "steps"], default="all", help="what to time"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(", ".join(f"{key} {value}" for key, value in env.items()), flush=True)
    results = run(QUICK_SIZES if args.quick else FULL_SIZES, args.rounds, args.memory, args.parts)
    print()
    print(markdown(results))
    if args.json is not None:
        payload = {"benchmark": "sparse_ops", "environment": env}
        payload["results"] = [asdict(r) for r in results]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
