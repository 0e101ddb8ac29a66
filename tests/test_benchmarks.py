"""The benchmarks' small settings run end to end and produce well-formed tables."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import generalization  # noqa: E402
import step_cost  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_step_cost_quick_setting():
    result = step_cost.run("quick", collectives=True, threads=1)
    ratios = result["timing"]["ratios"]
    assert set(ratios) == set(step_cost.ARMS)
    assert ratios["stock Trainer"] == (1.0, 1.0, 1.0)
    assert all(math.isfinite(v) and v > 0 for r in ratios.values() for v in r)
    memory = result["memory"]
    assert memory["stock Trainer"] == 0.0
    assert all(v is None or math.isfinite(v) for v in memory.values())
    counts = result["collectives"]["counts"]
    assert set(counts) == set(step_cost.DIST_ARMS)
    assert result["collectives"]["ratios"]["stock Trainer"][0] == 1.0
    assert all(math.isfinite(r[0]) and r[0] > 0 for r in result["collectives"]["ratios"].values())
    # Under 2 ranks every arm must reduce its gradients at least once per optimizer step, or ranks drift apart.
    for name, c in counts.items():
        reductions = c.get("DDP bucket all_reduce", 0) + c.get("all_reduce", 0) + c.get("reduce_scatter_tensor", 0)
        assert reductions >= 1, f"{name}: no gradient reduction per step ({c})"
    table = step_cost.markdown(result)
    assert "| GAM |" in table and "collectives per optimizer step" in table


def test_generalization_quick_setting(tmp_path):
    result = generalization.run("quick", figures=str(tmp_path), log=lambda m: None)
    s = generalization.SETTINGS["quick"]
    runs = result["runs"]
    # AdamW + SAM and GAM for every radius + the interval arm, per noise level and seed.
    assert len(runs) == len(s["noises"]) * len(s["seeds"]) * (2 + 2 * len(s["radii"]))
    for row in runs:
        assert 0.0 <= row["test"] <= 1.0 and 0.0 <= row["val"] <= 1.0
        assert math.isfinite(row["top_eigenvalue"]) and math.isfinite(row["trace"])
    for noise in s["noises"]:
        assert sum(1 for x in runs if x["noise"] == noise and x.get("chosen")) == 2 * len(s["seeds"])
    table = generalization.markdown(result)
    assert "| 20% | GAM, interval 2 |" in table
    for name in ("generalization.png", "landscape_1d_noise0.png", "landscape_2d_noise20.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_label_noise_rate_and_clean_copy():
    clean = [{"pixel_values": None, "labels": i % 10} for i in range(2000)]
    flipped = generalization.noisy(clean, 0.2, seed=0)
    changed = sum(a["labels"] != b["labels"] for a, b in zip(clean, flipped))
    assert 0.17 * 2000 < changed < 0.23 * 2000
    assert [e["labels"] for e in clean] == [i % 10 for i in range(2000)]
    assert generalization.noisy(clean, 0.2, seed=0) == flipped
