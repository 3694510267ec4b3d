"""Smoke tests: the benchmark scripts run end to end and write well-formed results.

They run the scripts as a user would (``python -m benchmarks.<script> --quick``)
in a subprocess, on tiny sizes with one thread, and check the structure of the
JSON and the Markdown, never the timings (CI machines are shared and noisy).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("mutual_choice", "feature_choice_uniform", "feature_choice_zipf")
STEP_ROWS = (
    "topk",
    "topk_sparse",
    "batchtopk",
    *(f"{name}_{impl}" for name in OURS for impl in ("dense", "sparse")),
)


def _run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_time_table_quick(tmp_path: Path) -> None:
    out = tmp_path / "step_time.json"
    proc = _run(
        "step_time", "--quick", "--threads", "1", "--sizes", "1", "--rounds", "2",
        "--json", str(out),
    )  # fmt: skip
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "step_time"
    settings = payload["settings"]
    assert settings["quick"] is True and settings["rounds"] == 2
    assert settings["archs"] == list(STEP_ROWS)
    # one block per dead fraction, each with every row, in order
    assert [b["key"] for b in payload["blocks"]] == ["cpu/1q/0", "cpu/1q/0.01"]
    for block in payload["blocks"]:
        rows = {r["arch"]: r for r in block["results"]}
        assert list(rows) == list(STEP_ROWS)
        assert block["results"] == [
            r for r in payload["results"] if f"cpu/1q/{r['dead_frac']:g}" == block["key"]
        ]
        topk = rows["topk"]
        assert topk["status"] == "ok"
        assert topk["ratio_median"] == pytest.approx(1.0)
        assert topk["ratios"] == pytest.approx([1.0, 1.0])
        assert topk["peak_ratio"] == pytest.approx(1.0)
        n_dead = round(block["results"][0]["dead_frac"] * topk["d_sae"])
        for name, r in rows.items():
            assert r["n_dead"] == n_dead
            # the bound is below TopK's dense step and above the encoder forward alone
            floor = 1 / (9 if n_dead else 6)
            assert floor < r["flop_bound_ratio"] < 1, name
            if r["status"] != "ok":
                # SAELens's sparse TopK backward is not implemented on CPU
                assert name == "topk_sparse" and r["status"].startswith("fails: ")
                assert f"| {name} | fails: " in proc.stdout
                continue
            assert len(r["ms_samples"]) == len(r["ratios"]) == 2
            assert all(_positive(x) for x in (r["ms_median"], r["ms_mean"], r["ratio_median"]))
            assert _positive(r["peak_mb"]) and r["peak_total_mb"] >= r["peak_mb"]
            assert _positive(r["peak_ratio"])
            if name.startswith("mutual_choice"):
                assert 0 <= r["mc_fallbacks"] <= r["mc_fallback_steps"]
        # the Feature Choice rows run no aux loss: their bound is the bare one
        fc = rows["feature_choice_zipf_sparse"]
        assert fc["flop_bound_ratio"] <= topk["flop_bound_ratio"]
        assert rows["mutual_choice_dense"]["flop_bound_ratio"] == topk["flop_bound_ratio"]
    # a table per block and the summary, with every row
    assert proc.stdout.count("| arch | median ms | time × topk | peak MB | memory × topk") == 2
    summary = proc.stdout[proc.stdout.index("Ratios to SAELens's dense TopK") :]
    for name in STEP_ROWS:
        assert f"| {name} | " in summary


def test_step_time_resume(tmp_path: Path) -> None:
    """--resume keeps the finished blocks of the JSON and measures only the missing ones."""
    out = tmp_path / "step_time.json"
    common = ("--quick", "--threads", "1", "--sizes", "1", "--rounds", "1", "--no-memory")
    common += ("--archs", "topk,feature_choice_uniform_sparse", "--json", str(out))
    _run("step_time", *common, "--dead-fracs", "0")
    first = json.loads(out.read_text())
    proc = _run("step_time", *common, "--dead-fracs", "0,0.01", "--resume")
    second = json.loads(out.read_text())
    assert [b["key"] for b in second["blocks"]] == ["cpu/1q/0", "cpu/1q/0.01"]
    assert second["blocks"][0] == first["blocks"][0]  # kept as it was, not re-measured
    assert "cpu/1q/0: from" in proc.stdout
    assert [r["arch"] for r in second["results"]] == ["topk", "feature_choice_uniform_sparse"] * 2


def test_step_time_crossover_quick(tmp_path: Path) -> None:
    out = tmp_path / "crossover.json"
    proc = _run("step_time", "--crossover", "--quick", "--threads", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "step_time_crossover"
    grid = payload["settings"]["grid"]
    archs = payload["settings"]["archs"]
    assert set(archs) == {"mutual_choice", "feature_choice_zipf"}
    points = payload["results"]
    expected = {
        (n, d_in, d_sae, k, arch)
        for n in grid["n_tokens"]
        for d_in in grid["d_in"]
        for d_sae in grid["d_sae"]
        for k in grid["k"]
        for arch in archs
        if k < d_sae
    }
    assert {(p["n_tokens"], p["d_in"], p["d_sae"], p["k"], p["arch"]) for p in points} == expected
    for p in points:
        assert _positive(p["dense_ms"]) and _positive(p["sparse_ms"])
        assert len(p["ratios"]) == payload["settings"]["rounds"]
        # the median of the same-round ratios (stored rounded to 4 digits)
        assert p["sparse_over_dense"] == pytest.approx(statistics.median(p["ratios"]), abs=1e-4)
    rule = payload["best_rule"]
    # the thresholds come from the grid (or infinity: never sparse)
    assert rule["d_sae_min"] in [*grid["d_sae"], math.inf]
    assert rule["d_in_min"] in [*grid["d_in"], math.inf]
    assert 0 <= rule["time_lost"] <= payload["current_rule_time_lost"] + 1e-12
    assert "| d_in \\ d_sae |" in proc.stdout
    assert "Best rule over the grid: sparse when d_sae >=" in proc.stdout


def test_allocation_quick(tmp_path: Path) -> None:
    out = tmp_path / "allocation.json"
    proc = _run("allocation", "--quick", "--threads", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    assert "environment" in payload
    results = payload["results"]
    rules = {r["rule"] for r in results}
    assert "token_choice" in rules
    assert any(rule.startswith("mutual_choice") for rule in rules)
    assert any(rule.startswith("feature_choice") for rule in rules)
    for r in results:
        assert _positive(r["ms_median"]) and _positive(r["ratio_to_token_choice"])
    baseline = [r for r in results if r["rule"] == "token_choice"]
    assert baseline and all(r["ratio_to_token_choice"] == pytest.approx(1.0) for r in baseline)
    assert "| rule | ms / call (median) | × token_choice |" in proc.stdout


def test_sparse_ops_quick(tmp_path: Path) -> None:
    out = tmp_path / "sparse_ops.json"
    proc = _run("sparse_ops", "--quick", "--threads", "1", "--rounds", "2", "--json", str(out))
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "sparse_ops"
    results = payload["results"]
    ops = {r["op"] for r in results}
    assert {"decode", "grad_acts", "grad_W_dec", "grad_sae_in", "grad_W_enc"} <= ops
    assert {"step, 0% dead", "step, 1% dead"} <= ops
    for op in ops - {"layout"}:
        rows = {r["candidate"]: r for r in results if r["op"] == op}
        # every op is compared with its dense reference: the product, or SAELens's step
        reference = "SAELens TopK (dense)" if op.startswith("step") else "dense"
        assert rows[reference]["ratio_to_dense"] == pytest.approx(1.0), op
        for r in rows.values():
            assert _positive(r["ms_median"]) and _positive(r["ratio_to_dense"]), op
            assert r["rounds"] == 2, op
    assert "| op | candidate | ms (median) |" in proc.stdout


def test_collective_quick(tmp_path: Path) -> None:
    out = tmp_path / "collective.json"
    proc = _run("collective", "--quick", "--ranks", "2", "--json", str(out))
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "collective"
    results = payload["results"]
    assert {(r["rule"], r["method"]) for r in results} == {
        (rule, method)
        for rule in ("mutual_choice", "feature_choice zipf")
        for method in ("candidates", "full")
    }
    for r in results:
        assert r["ranks"] == 2 and r["rounds"] >= 1
        assert _positive(r["select_ms"]) and _positive(r["sent_kib"])
        assert len(r["select_ms_per_rank"]) == 2
    assert payload["estimate_8_gpus"]
    assert "| ranks | rule | method | select ms |" in proc.stdout
