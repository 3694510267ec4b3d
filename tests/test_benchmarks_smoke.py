"""Smoke tests: the benchmark scripts run end to end and write well-formed JSON.

They run the scripts as a user would (``python benchmarks/<script>.py --quick``)
in a subprocess, on tiny sizes with one thread, and check the shape of the
results, never the timings (CI machines are shared and noisy).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STEP_ARCHS = {"topk", "batchtopk", "mutual_choice", "feature_choice_uniform", "feature_choice_zipf"}


def _run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _check_step_time_json(path: Path, mode: str) -> None:
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "step_time"
    assert payload["mode"] == mode
    assert payload["settings"]["quick"] is True
    results = payload["results"]
    by_size: dict[str, dict[str, dict]] = {}
    for r in results:
        by_size.setdefault(r["size"], {})[r["arch"]] = r
    assert set(by_size) == {"1q", "2q"}
    for rows in by_size.values():
        assert set(rows) == STEP_ARCHS
        for arch, r in rows.items():
            assert r["mode"] == mode and r["device"] == "cpu"
            assert r["ms_median"] > 0 and r["ms_mean"] > 0
            assert len(r["ms_samples"]) == payload["settings"]["rounds"]
            assert len(r["ratios"]) == payload["settings"]["rounds"]
            assert math.isfinite(r["ratio_median"]) and r["ratio_median"] > 0
            # peak memory above the resting state, as the kernel counts it
            assert math.isfinite(r["peak_mb"]) and r["peak_mb"] >= 0
            assert r["peak_total_mb"] >= r["peak_mb"]
            if arch == "mutual_choice":
                assert 0 <= r["mc_fallbacks"] <= r["mc_fallback_steps"]
        assert rows["topk"]["ratio_median"] == pytest.approx(1.0)
        assert all(x == pytest.approx(1.0) for x in rows["topk"]["ratios"])


@pytest.mark.parametrize("mode", ["step", "allocation"])
def test_step_time_quick(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "step_time.json"
    proc = _run("step_time.py", "--quick", "--threads", "1", "--mode", mode, "--json", str(out))
    _check_step_time_json(out, mode)
    # the Markdown table the issue asks for
    assert "| arch | median ms | median ratio to topk | peak MB | ratio " in proc.stdout
    for arch in STEP_ARCHS:
        assert f"| {arch}" in proc.stdout


def test_allocation_quick(tmp_path: Path) -> None:
    if not (BENCHMARKS / "allocation.py").exists():
        pytest.skip("benchmarks/allocation.py is not there yet")
    out = tmp_path / "allocation.json"
    _run("allocation.py", "--quick", "--threads", "1", "--json", str(out))
    payload = json.loads(out.read_text())
    assert "environment" in payload
    results = payload["results"]
    assert results, "no results written"
    rules = {r["rule"] for r in results}
    assert "token_choice" in rules
    assert any(rule.startswith("mutual_choice") for rule in rules)
    assert any(rule.startswith("feature_choice") for rule in rules)
    for r in results:
        assert r["ms_median"] > 0
        assert math.isfinite(r["ratio_to_token_choice"]) and r["ratio_to_token_choice"] > 0
    baseline = [r for r in results if r["rule"] == "token_choice"]
    assert all(r["ratio_to_token_choice"] == pytest.approx(1.0) for r in baseline)
