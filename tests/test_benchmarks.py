"""The benchmarks' small settings run end to end and produce well-formed tables."""

import json
import math
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import finetune  # noqa: E402
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


def test_generalization_quick_runs_every_regime_and_counts_passes(tmp_path, capsys):
    """`--quick` end to end (a subset of its arms, plus one from the command line), through the fine-tuning
    recipe too; the counted forward passes are exactly 2x and 4x AdamW's for SAM, AdamW 2x and GAM."""
    path = tmp_path / "gen.json"
    generalization.main([
        "--quick", "--regimes", "underfit,finetune", "--arms", "adamw_2x,gam_default,pretrain_gam", "--arm", "sam_lr=gam_method=sam,gam_grad_rho=0.05,gam_rho_schedule=lr,gam_start=0.0",
        "--arm", "gam_full=gam_start=0.0,gam_rho_schedule=constant",
        "--json", str(path),
    ])
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())
    runs = saved["runs"]
    regimes = ["underfit", "finetune"]
    arms = ["adamw", "adamw_2x", "gam_default", "pretrain_gam", "sam_lr", "gam_full"]
    assert sorted((r["regime"], r["arm"]) for r in runs) == sorted((g, a) for g in regimes for a in arms)
    for regime in regimes:
        rows = {r["arm"]: r for r in runs if r["regime"] == regime}
        assert rows["adamw"]["examples"] > 0
        ratios = {a: rows[a]["examples"] / rows["adamw"]["examples"] for a in arms}
        # PRETRAIN_GAM runs stock steps for the first 75% of the steps, GAM's 4 passes after; the defaults GAM's 4.
        assert 1.0 < ratios.pop("pretrain_gam") < 4.0, regime
        assert ratios == {"adamw": 1.0, "adamw_2x": 2.0, "gam_default": 4.0, "sam_lr": 2.0, "gam_full": 4.0}, regime
        for r in rows.values():
            assert all(0.0 <= r[k] <= 1.0 for k in ("train", "val", "test")) and math.isfinite(r["eig"])
            assert r["seconds"] > 0
        assert f"### {regime}" in out
    assert saved["arms"]["sam_lr"] == {"gam_method": "sam", "gam_grad_rho": 0.05, "gam_rho_schedule": "lr",
                                       "gam_start": 0.0}
    # The tables can be re-made from the saved numbers alone.
    capsys.readouterr()
    generalization.main(["--tables", str(path)])
    assert capsys.readouterr().out.strip() == out.split("\nTotal wall time")[0].strip()


def test_arm_parsing_and_selection():
    name, config = generalization.parse_arm("late=gam_grad_rho=0.05,gam_interval=2,gam_adaptive=True,gam_rho_schedule=lr")
    assert name == "late"
    assert config == {"gam_grad_rho": 0.05, "gam_interval": 2, "gam_adaptive": True, "gam_rho_schedule": "lr"}
    assert type(config["gam_interval"]) is int and type(config["gam_grad_rho"]) is float
    assert generalization.parse_arm("defaults=") == ("defaults", {})
    with pytest.raises(ValueError, match="name=key=value"):
        generalization.parse_arm("gam_grad_rho")
    with pytest.raises(ValueError, match="not key=value"):
        generalization.parse_arm("x=gam_grad_rho")

    s = generalization.SETTINGS["full"]
    arms, sweeps = generalization.builtin_arms(s)
    assert arms["gam_default"] == {} and arms["adamw_4x"] == {"gam_method": "none", "epochs_x": 4}
    assert len(sweeps["gam"]) == len(s["gam_grad_rho"]) * len(s["gam_grad_norm_rho"]) == len(sweeps["sam"])
    assert max(arms[a]["gam_grad_rho"] for a in sweeps["sam"]) == 0.1
    picked = generalization.select_arms(arms, sweeps, ["gam_default", "sam_sweep"])
    assert list(picked) == ["adamw", "gam_default", *sweeps["sam"]]
    with pytest.raises(ValueError, match="Unknown arm 'nope'"):
        generalization.select_arms(arms, sweeps, ["nope"])


def test_bad_arm_fails_before_training():
    generalization.check_arms({"ok": {"gam_method": "sam", "epochs_x": 2}})
    with pytest.raises(ValueError, match="Arm 'typo'.*gam_grad_rhoo"):
        generalization.check_arms({"typo": {"gam_grad_rhoo": 0.05}})
    with pytest.raises(ValueError, match="Arm 'neg'.*gam_grad_rho"):
        generalization.check_arms({"neg": {"gam_grad_rho": -1.0}})
    with pytest.raises(ValueError, match="epochs_x"):
        generalization.check_arms({"zero": {"epochs_x": 0}})


def test_paired_t_interval_matches_a_hand_computed_value():
    # Differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.29099, t(0.975, 3 d.o.f.) = 3.18245 from a t table,
    # half-width 3.18245 * 1.29099 / 2 = 2.05426.
    mean, low, high = generalization.t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert low == pytest.approx(2.5 - 2.05426, abs=1e-5) and high == pytest.approx(2.5 + 2.05426, abs=1e-5)
    assert all(math.isnan(v) for v in generalization.t_interval([0.3])[1:])
    # A negative eigenvalue has no log ratio: the interval is nan, not an error that loses the whole table.
    assert all(math.isnan(v) for v in generalization.t_interval([0.1, math.nan, 0.2]))
    arm = [{"seed": 0, "test": 0.9}, {"seed": 1, "test": 0.7}, {"seed": 5, "test": 0.1}]
    adamw = [{"seed": 1, "test": 0.5}, {"seed": 0, "test": 0.8}]
    diffs = generalization.paired(arm, adamw, lambda r, a: r["test"] - a["test"])
    assert diffs == pytest.approx([0.1, 0.2])  # matched by seed; seed 5 has no AdamW run


def test_sweep_choice_uses_validation_not_test():
    """Arm `b` has the best test accuracy, `a` the best validation accuracy: `a` must be chosen and marked."""
    s = dict(generalization.SETTINGS["quick"], regimes=["fit"], seeds=[0, 1])
    arms, sweeps = generalization.builtin_arms(dict(s, gam_grad_rho=[0.005, 0.02], gam_grad_norm_rho=[0.05]))
    a, b = sweeps["gam"]
    numbers = {"adamw": (0.80, 0.80), a: (0.90, 0.70), b: (0.70, 0.95)}  # (val, test)
    runs = [dict(regime="fit", seed=seed, arm=name, val=val + 0.01 * seed, test=test, train=1.0, eig=10.0,
                 examples=100, seconds=1.0) for seed in (0, 1) for name, (val, test) in numbers.items()]
    assert generalization.choose(runs, "fit", sweeps["gam"]) == a
    assert generalization.choose(runs, "fit", sweeps["sam"]) is None
    s = dict(s, gam_grad_rho=[0.005, 0.02], gam_grad_norm_rho=[0.05])
    table = generalization.markdown({"settings": s, "arms": {n: arms[n] for n in numbers}, "runs": runs})
    assert f"| {a} * |" in table and f"| {b} |" in table
    assert f"GAM `{a}`" in table


def test_finetune_quick_counts_passes_measures_compression_and_remakes_tables(tmp_path, capsys):
    path, models = tmp_path / "ft.json", tmp_path / "models"
    finetune.main(["--quick", "--scenarios", "vit_100", "--arms", "gam,sam_0.05,r3,pretrain_gam,sam_0.05@1x",
                   "--save_models", str(models), "--json", str(path)])
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["settings"]["environment"] == finetune.environment()  # what the numbers depend on, recorded
    runs = saved["runs"]
    rows = {r["arm"]: r for r in runs}
    assert sorted(rows) == ["adamw", "gam", "pretrain_gam", "r3", "sam_0.05", "sam_0.05@1x"]
    ratios = {a: r["examples"] / rows["adamw"]["examples"] for a, r in rows.items()}
    # 100 images, batch 32, 2 epochs: 8 steps of 32, 32, 32, 4, 32, 32, 32, 4 images. Reuse 3: full steps 0, 3, 6
    # (4 passes), one pass on the others. PRETRAIN_GAM: stock steps 0-5 (the first 75%), GAM at steps 6 and 7.
    # SAM at AdamW's compute: 1 epoch of 2 passes.
    sizes = [32, 32, 32, 4] * 2
    assert ratios == pytest.approx({
        "adamw": 1.0, "gam": 4.0, "sam_0.05": 2.0, "sam_0.05@1x": 1.0,
        "r3": sum(n * (4 if i % 3 == 0 else 1) for i, n in enumerate(sizes)) / 200,
        "pretrain_gam": sum(n * (4 if i >= 6 else 1) for i, n in enumerate(sizes)) / 200})
    for r in runs:
        assert set(r["compression"]) == {"pruned_90", "pruned_70", "weights_2bit", "weights_3bit", "int8_dynamic",
                                         "noise_0.1"}
        assert all(0.0 <= v <= 1.0 for v in [r["test"], r["val"], r["train"], *r["compression"].values()])
    assert "### vit_100" in out and "Bars over vit_100" in out
    # At AdamW's budget, SAM at 1 epoch is compared with AdamW; at 2x, SAM and r3 with AdamW at 2x, absent here.
    assert "### vit_100: equal compute" in out and "| 1x | sam* (`sam_0.05@1x`) | 1 | 1.00 |" in out
    capsys.readouterr()
    finetune.main(["--tables", str(path)])
    assert capsys.readouterr().out.strip() == out.split("\nTotal wall time")[0].strip()

    # The saved models are the fine-tuned ones: measured again without training, they give the saved accuracy.
    saved = {r["arm"]: r for r in finetune.saved_runs(str(models))}
    assert sorted(saved) == sorted(rows) and saved["gam"]["test"] == rows["gam"]["test"]
    measured_path = tmp_path / "formats.json"
    finetune.main(["--quick", "--measure", str(models), "--arms", "adamw,gam", "--formats", "int8,mlp:0.5",
                   "--json", str(measured_path)])
    out = capsys.readouterr().out
    measured = json.loads(measured_path.read_text())
    assert sorted(r["arm"] for r in measured["runs"]) == ["adamw", "gam"]
    for r in measured["runs"]:
        assert {"int8", "mlp_0.5", "mlp_0.5_rec", "pruned_90"} <= set(r["compression"])
        assert all(0.0 <= r["compression"][k] <= 1.0 for k in ("int8", "mlp_0.5", "mlp_0.5_rec"))
        assert r["examples"] == rows[r["arm"]]["examples"]
    sizes = measured["sizes"]["vit_100"]
    assert sizes["int8"]["disk_mb"] < 0.5 * sizes["float"]["disk_mb"]
    assert sizes["mlp_0.5"]["parameters"] < sizes["float"]["parameters"]
    assert "### vit_100: deployable formats" in out and "| mlp_0.5 + recovery |" in out


def test_finetune_refuses_an_arm_twice_and_has_no_duplicate_builtin_arm():
    from hf_gam import CHEAP_GAM

    arms, _ = finetune.builtin_arms()
    assert not finetune.duplicate_arms(arms)
    assert "cheap_gam" not in arms and arms["r3"] == dict(CHEAP_GAM)
    assert finetune.duplicate_arms({"a": {"gam_interval": 2}, "b": {"gam_interval": 2, "epochs_x": 1},
                                    "c": {"gam_interval": 2, "epochs_x": 2}}) == [("a", "b")]
    assert arms["gam@1x"]["epochs_x"] == 0.25 and arms["sam_0.1@1x"]["epochs_x"] == 0.5
    assert arms["adamw_2x"] == {"gam_method": "none", "epochs_x": 2} and "gam@4x" not in arms
    with pytest.raises(SystemExit):
        finetune.main(["--quick", "--arms", "r3", "--arm", "twin=gam_reuse_interval=3"])


def test_finetune_merge_warns_when_the_environments_differ(tmp_path):
    def saved(name, environment, arm):
        settings = {"scenarios": ["s1"], "epochs": 40}
        if environment is not None:
            settings["environment"] = environment
        run = dict(scenario="s1", seed=0, arm=arm, compression={})
        path = tmp_path / name
        path.write_text(json.dumps({"settings": settings, "arms": {arm: {}}, "runs": [run]}))
        return str(path)

    here = finetune.environment()
    a, b = saved("a.json", here, "adamw"), saved("b.json", here, "gam")
    elsewhere = saved("c.json", dict(here, cpu_capability="another"), "r3")
    older = saved("d.json", None, "sam_0.1")  # saved before environments were recorded: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(finetune.merge([a, b, older])["runs"]) == 3
    with pytest.warns(UserWarning, match="different environments.*c.json"):
        assert len(finetune.merge([a, elsewhere])["runs"]) == 2


def test_finetune_equal_compute_groups_by_passes_and_the_cheap_bar():
    """Two development scenarios and a held-out one, two seeds. At 1x: AdamW, SAM at 20 epochs (two radii), GAM at
    10; at 2x: AdamW 2x, SAM at 40 epochs, r3 and r4 (1.7 passes: no budget)."""
    def row(scenario, seed, arm, examples, val, test, pruned):
        return dict(scenario=scenario, seed=seed, arm=arm, val=val, test=test, train=1.0, eig=1.0,
                    examples=examples, compression={"pruned_90": pruned})

    runs = []
    for scenario in ("s1", "s2", "h"):
        for seed in (0, 1):
            runs += [row(scenario, seed, "adamw", 100, 0.8, 0.90, 0.50), row(scenario, seed, "adamw_2x", 200, 0.8, 0.91, 0.40),
                     row(scenario, seed, "sam_0.05@1x", 100, 0.9, 0.92, 0.60),
                     row(scenario, seed, "sam_0.1@1x", 100, 0.7, 0.99, 0.99),
                     row(scenario, seed, "gam@1x", 100, 0.8, 0.89, 0.70),
                     row(scenario, seed, "sam_0.1", 200, 0.8, 0.93, 0.60),
                     row(scenario, seed, "r3", 200, 0.8, 0.94 if scenario != "h" else 0.92, 0.70),
                     row(scenario, seed, "r4", 170, {"s1": 0.85, "s2": 0.77, "h": 0.5}[scenario], 0.95, 0.80)]
    assert finetune.budget_of(runs, "s1", "r3") == 2 and finetune.budget_of(runs, "s1", "r4") is None
    assert finetune.arms_at(runs, "s1", ["adamw", "sam_0.05@1x", "sam_0.1@1x", "gam@1x", "r3"], 1) == {
        "adamw": "adamw", "gam": "gam@1x", "sam*": "sam_0.05@1x"}  # SAM* chosen on validation, not on test
    arms = ["adamw", "adamw_2x", "sam_0.05@1x", "sam_0.1@1x", "gam@1x", "sam_0.1", "r3", "r4"]
    result = {"settings": {"scenarios": ["s1", "s2", "h"], "epochs": 40}, "arms": {a: {} for a in arms}, "runs": runs}
    lines = finetune.equal_compute_summary(result, ["s1", "s2"], "Development")
    assert "| 1x | gam | -0.010 [-0.010, -0.010] | -0.010, -0.010 | +0.200 [+0.200, +0.200] | +0.200, +0.200 | " \
        "-0.030 [-0.030, -0.030] | +0.100 [+0.100, +0.100] |" in lines
    assert not any("| r4 |" in line for line in lines)
    curves = finetune.compute_curves(result, ["s1", "s2"])
    assert curves["adamw"] == [(1.0, 0.90, 0.50), (2.0, 0.91, 0.40)] and curves["sam*"][1] == (2.0, 0.93, 0.60)
    # r3 beats SAM* (sam_0.1 at 40 epochs) in both development scenarios but not on the held-out one's accuracy;
    # r4 beats it everywhere at 1.7 passes: the cheapest that meets the bar. Its validation accuracy is the mean over
    # the development scenarios only.
    answer = finetune.cheap_answer(result, ["s1", "s2"], ["h"])
    assert any(line.startswith("- r3 (2.00 passes)") and line.endswith("-> does not") for line in answer)
    assert any(line.startswith("- r4 (1.70 passes)") and line.endswith("validation accuracy 0.810 -> meets the bar")
               for line in answer)
    assert answer[-1] == "- cheapest that meets the bar: r4 (1.70 passes)"


def test_digits_transfer_splits_draws_and_flipped_labels():
    from hf_gam.vision import digits

    _, labels = digits.digits_by_class(8)
    test, validation, pool = digits.split_target(labels, digits.TARGET_CLASSES, 300, 100)
    assert (len(test), len(validation)) == (300, 100) and not set(test) & set(validation)
    assert not set(pool) & (set(test) | set(validation))
    assert {labels[i] for i in test + validation + pool} == {5, 6, 7, 8, 9}
    assert len(test) + len(validation) + len(pool) == sum(y >= 5 for y in labels) == len(
        digits.class_indices(labels, digits.TARGET_CLASSES))
    assert digits.split_target(labels, digits.TARGET_CLASSES) == (test, validation, pool)  # one fixed split
    drawn = digits.draw(pool, 100, seed=1)
    assert len(drawn) == 100 and set(drawn) <= set(pool) and drawn == sorted(drawn)
    assert drawn == digits.draw(pool, 100, seed=1) != digits.draw(pool, 100, seed=2)
    assert digits.draw(pool, 10_000, seed=1) == sorted(pool)
    rows = [{"labels": i % 5} for i in range(500)]
    flipped = digits.flip_labels(rows, 0.2, 5, seed=3)
    changed = [i for i, (a, b) in enumerate(zip(rows, flipped)) if a["labels"] != b["labels"]]
    assert len(changed) == 100  # exactly 20%, each to another class
    assert flipped == digits.flip_labels(rows, 0.2, 5, seed=3) and rows[0] == {"labels": 0}
    x, _ = digits.digits_by_class(16)
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1.0 and x.max() <= 1.0
    for arch in ("vit", "resnet"):
        model = digits.digits_model(arch, 5)
        logits = model(pixel_values=x[:2, :, :digits.IMAGE_SIZE[arch], :digits.IMAGE_SIZE[arch]]).logits
        assert logits.shape == (2, 5)


def test_finetune_summary_chooses_sam_on_validation_and_checks_the_bars():
    """Two scenarios, two seeds. SAM 0.1 has the better test accuracy but SAM 0.05 the better validation accuracy:
    SAM* is 0.05. The defaults gain 0.01 and lose 0.1 to pruning against AdamW's 0.4."""
    def row(scenario, seed, arm, val, test, pruned, examples):
        return dict(scenario=scenario, seed=seed, arm=arm, val=val, test=test, train=1.0, eig=1.0, examples=examples,
                    compression={"pruned_90": pruned})

    runs = []
    for scenario in ("s1", "s2"):
        for seed in (0, 1):
            runs += [row(scenario, seed, "adamw", 0.80, 0.90, 0.50, 100), row(scenario, seed, "gam", 0.81, 0.91, 0.81, 400),
                     row(scenario, seed, "sam_0.05", 0.85, 0.905, 0.60, 200),
                     row(scenario, seed, "sam_0.1", 0.70, 0.95, 0.70, 200),
                     row(scenario, seed, "r3", 0.80, 0.909, 0.75, 200),
                     row(scenario, seed, "r3@1x", 0.80, 0.909, 0.75, 100)]
    assert finetune.choose_sam(runs, "s1", ["sam_0.02", "sam_0.05", "sam_0.1"]) == "sam_0.05"
    rows = finetune.summary(runs, ["s1", "s2"], ["adamw", "gam", "sam_0.05", "sam_0.1", "r3"], ["sam_0.05", "sam_0.1"])
    assert rows["gam"]["d_test"] == pytest.approx(0.01) and rows["gam"]["d_pruned"] == pytest.approx(0.31)
    assert rows["gam"]["loss_ratio"] == pytest.approx(0.1 / 0.4) and rows["gam"]["passes"] == 4.0
    assert rows["sam*"]["d_test"] == pytest.approx(0.005)
    result = {"settings": {"scenarios": ["s1", "s2"]}, "arms": {a: {} for a in ("adamw", "gam", "sam_0.05", "sam_0.1",
                                                                                "r3", "r3@1x")}, "runs": runs}
    lines = finetune.verdicts(result, ["s1", "s2"])
    assert "- defaults beat AdamW by >= 0.008 on average: +0.0100 -> met" in lines
    assert "- defaults match or beat SAM*: +0.0100 vs +0.0050 -> met" in lines
    assert "- 90% pruning costs the defaults at most half of what it costs AdamW: 0.25 -> met" in lines
    # r3 keeps 90% of the accuracy gain and 0.25 / 0.31 = 81% of the pruning gain, and beats SAM* on both.
    assert "- r3 (2.00 passes): keeps 90% of the accuracy gain and 81% of the pruning gain (80% of both: yes); " \
        "beats SAM* on both: yes -> meets the bar on the averages" in lines
    assert not any(line.startswith("- r3@1x") for line in lines)  # other epochs: not a setting
