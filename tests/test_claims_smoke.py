"""Smoke tests for benchmarks.claims (the paper-claims benchmark)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def claims():
    # benchmarks/ is a package importable from the repository root (pytest pythonpath)
    from benchmarks import claims as module

    return module


def test_compare_uses_seed_spread(claims):
    # means 1.0 vs 1.1, std 0.01 each over 3 seeds: a clear difference
    assert claims._compare([0.99, 1.0, 1.01], [1.09, 1.1, 1.11], higher_better=False)[0] == "better"
    assert claims._compare([0.99, 1.0, 1.01], [1.09, 1.1, 1.11], higher_better=True)[0] == "worse"
    # overlapping spreads: a tie
    assert claims._compare([0.9, 1.0, 1.1], [0.95, 1.05, 1.15], higher_better=False)[0] == "tie"


def test_split_filter_drops_early_positions(claims):
    x = torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 3)
    pos = torch.arange(20) % 10
    split = claims.Split(
        train=x, calib=x, eval=x, train_pos=pos, calib_pos=pos, eval_pos=pos
    ).filtered(4)
    assert split.train.shape[0] == 12
    assert bool((split.train_pos >= 4).all())


def test_same_data_order_for_every_architecture(claims):
    x = torch.randn(100, 4)
    a = claims.data_iterator(x, 16, seed=3)
    b = claims.data_iterator(x, 16, seed=3)
    for _ in range(10):  # crosses an epoch boundary
        assert torch.equal(next(a), next(b))


def test_quick_synthetic_run_writes_report(claims, tmp_path):
    out = tmp_path / "docs"
    rc = claims.main(
        [
            "--quick",
            "--sources",
            "synthetic",
            "--archs",
            "topk",
            "mc_auxzipf",
            "fc_zipf",
            "fc_uniform",
            "--output",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert rc == 0
    text = (out / "results.md").read_text()
    assert "### synthetic, k = 16, threshold mode" in text
    assert "Feature Choice (Zipf)" in text
    assert "b_dec is initialised at the training-data mean" in text
    assert (out / "claims_synthetic_frontier.png").is_file()
    runs = [json.loads(p.read_text()) for p in (tmp_path / "work").glob("synthetic_*.json")]
    assert len(runs) == 4
    for r in runs:
        for mode in ("threshold", "batch"):
            m = r[mode]
            assert 0 <= m["nmse"] < 2
            assert 0 <= m["mcc"] <= 1
        if r["spec"]["arch"].startswith("fc_"):
            # batch mode keeps at most k * N pairs per batch (fewer only where a
            # latent's capacity exceeds its positive pre-activations, as for the
            # water-filled head of Zipf capacities); FC never lets a latent die
            assert r["batch"]["l0_mean"] <= 16 * 1.001
            if r["spec"]["arch"] == "fc_uniform":
                assert r["batch"]["l0_mean"] == pytest.approx(16, rel=0.05)
            assert r["batch"]["dead"] == 0
    # resuming reuses the stored runs
    before = {p.name: p.stat().st_mtime for p in (tmp_path / "work").glob("synthetic_*.json")}
    claims.main(
        [
            "--quick",
            "--sources",
            "synthetic",
            "--archs",
            "topk",
            "--output",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    after = {p.name: p.stat().st_mtime for p in (tmp_path / "work").glob("synthetic_*.json")}
    assert all(after[name] == t for name, t in before.items() if name in after)
