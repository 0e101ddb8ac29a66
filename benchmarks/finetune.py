"""Does GAM pay in fine-tuning? AdamW, SAM and GAM settings fine-tuning pretrained models on scikit-learn's digits.

Every scenario starts from source models pretrained (AdamW, the stock step) on some digit classes, one per seed,
saved with `save_pretrained`, and fine-tunes them on the other classes, loaded with `from_pretrained` and a new
5-way head, as a user of the Trainer does:

  vit_500          a ViT (patch 2, 4 layers, hidden 64) pretrained on digits 0-4, fine-tuned on 496 images of 5-9
  vit_100          the same, fine-tuned on 100 images (a seeded subset)
  resnet_500       a ResNet (`ResNetForImageClassification`, 2 stages, BatchNorm) on the digits resized to 16x16
  vit_500_noisy    vit_500 with 20% of the fine-tuning labels flipped to another class (validation and test clean)
  vit_500_swapped  the class halves swapped: pretrained on 5-9, fine-tuned on 0-4. Held out: `--choose-on` leaves it
                   out of the choice of the cheap setting, so it checks that choice on data it did not see.

The images of the fine-tuning classes are split once (seed 0): 300 for test, 100 for validation, the rest (496 of
the digits 5-9, 501 of 0-4) the pool the training images come from. Fine-tuning: AdamW lr 1e-3, weight decay 0.05, batch 32, 40 epochs (AdamW fits
its set in the first few), cosine decay, 5% warm-up, clipping at 1; the arms differ only in their `gam_*` values
and `epochs_x` (a multiple of the epochs).

Arms (`--arms` picks a subset; `--arm NAME=KEY=VALUE,...` adds one):
  adamw, adamw_2x, adamw_4x   the stock step for 1x, 2x and 4x the epochs: AdamW given the compute of SAM and GAM
  sam_<rho>                   SAM with constant radius rho (0.02, 0.05, 0.1); the validation-best one is `sam*`
  gam                         `GAMConfig()`'s defaults
  pretrain_gam                `hf_gam.PRETRAIN_GAM` (the late, ramped setting for training from scratch)
  cheap_gam                   `hf_gam.CHEAP_GAM`
  i2, i3, r3, r4, late_0.67, bf_0.25   candidates for a cheap setting: GAM every 2nd or 3rd step
                              (`gam_interval`, 2.5 and 2 passes per step), reuse of the last correction for 3 or 4 steps (`gam_reuse_interval`),
                              GAM from 2/3 of the run with constant radii (`gam_start=0.667`), passes on a quarter of
                              the batch (`gam_batch_fraction=0.25`)

Reported per scenario and arm, over seeds (arms of one seed share the source model, the fine-tuning images and
the new head, and run in a shuffled order): test accuracy; accuracy after compression (`hf_gam.compression`, on
the test split: 90% and 70% global magnitude pruning, 2- and 3-bit round-to-nearest weights, int8 dynamic
quantization, weight noise 0.1); the top Hessian eigenvalue of the training loss (256 training examples, 10 power
iterations); forward/backward passes relative to AdamW (examples forwarded in training mode, counted); paired
differences to AdamW of the same seed with 95% t-intervals. A summary table averages the paired differences over
scenarios and checks the bars the defaults and the cheap setting are held to.

    python benchmarks/finetune.py --json ft.json                       # everything: 5 scenarios x 5 seeds x 14 arms
    python benchmarks/finetune.py --scenarios vit_500,vit_100 --json a.json   # a part (runs in parallel merge)
    python benchmarks/finetune.py --tables a.json b.json               # tables of saved runs (merged)
    python benchmarks/finetune.py --quick                              # 1 seed, tiny budgets (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generalization import _ci as _interval_text  # noqa: E402
from generalization import choose, count_training_examples, paired, parse_arm, run_grid, t_interval  # noqa: E402

from hf_gam.vision import collate_fn  # noqa: E402
from hf_gam.vision.digits import (  # noqa: E402
    IMAGE_SIZE,
    class_indices,
    digits_by_class,
    digits_model,
    draw,
    examples,
    flip_labels,
    split_target,
)

SETTINGS = {
    "full": dict(seeds=[0, 1, 2, 3, 4], scenarios=["vit_500", "vit_100", "resnet_500", "vit_500_noisy", "vit_500_swapped"],
                 pretrain_epochs=30, epochs=40, n_test=300, n_validation=100, flat_examples=256, eig_iters=10,
                 noise_draws=3),
    "quick": dict(seeds=[0], scenarios=["vit_100", "resnet_500"], pretrain_epochs=2, epochs=2, n_test=300,
                  n_validation=100, flat_examples=64, eig_iters=3, noise_draws=1),
}
HELD_OUT = ("vit_500_swapped",)
LEARNING_RATE, PRETRAIN_LEARNING_RATE, WEIGHT_DECAY, BATCH = 1e-3, 2e-3, 0.05, 32
SAM_RHO = (0.02, 0.05, 0.1)
COMPRESSIONS = ("prune:0.9", "prune:0.7", "rtn:2", "rtn:3", "int8_dynamic", "noise:0.1")
CANDIDATES = {
    "i2": {"gam_interval": 2},
    "i3": {"gam_interval": 3},
    "r3": {"gam_reuse_interval": 3},
    "r4": {"gam_reuse_interval": 4},
    "late_0.67": {"gam_start": 0.667},
    "bf_0.25": {"gam_batch_fraction": 0.25},
}
"""Cheap-setting candidates, each on top of `GAMConfig()`'s defaults."""


@dataclass(frozen=True)
class Scenario:
    arch: str
    n_train: int
    noise: float = 0.0
    source: tuple = (0, 1, 2, 3, 4)
    target: tuple = (5, 6, 7, 8, 9)


SCENARIOS = {
    "vit_500": Scenario("vit", 500),
    "vit_100": Scenario("vit", 100),
    "resnet_500": Scenario("resnet", 500),
    "vit_500_noisy": Scenario("vit", 500, noise=0.2),
    "vit_500_swapped": Scenario("vit", 500, source=(5, 6, 7, 8, 9), target=(0, 1, 2, 3, 4)),
}


def builtin_arms() -> tuple[dict[str, dict], list[str]]:
    """The arms and the names of the SAM sweep."""
    from hf_gam import CHEAP_GAM, PRETRAIN_GAM

    arms = {
        "adamw": {"gam_method": "none"},
        "adamw_2x": {"gam_method": "none", "epochs_x": 2},
        "adamw_4x": {"gam_method": "none", "epochs_x": 4},
        "gam": {},
        "pretrain_gam": dict(PRETRAIN_GAM),
        "cheap_gam": dict(CHEAP_GAM),
        **{name: dict(config) for name, config in CANDIDATES.items()},
    }
    sam = [f"sam_{rho:g}" for rho in SAM_RHO]
    for name, rho in zip(sam, SAM_RHO):
        arms[name] = {"gam_method": "sam", "gam_grad_rho": rho}
    return arms, sam


# --------------------------------------------------------------------------------------------------
# Training


def train(model, rows: list[dict], epochs: float, learning_rate: float, seed: int, out_dir: str, arm: dict):
    """Train through `GAMTrainer`; returns (model, examples forwarded in training mode)."""
    from hf_gam import GAMConfig, GAMTrainer

    config = {k: v for k, v in arm.items() if k != "epochs_x"}
    args = GAMConfig(
        output_dir=out_dir, num_train_epochs=epochs * arm.get("epochs_x", 1), per_device_train_batch_size=BATCH,
        learning_rate=learning_rate, weight_decay=WEIGHT_DECAY, lr_scheduler_type="cosine", warmup_steps=0.05,
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        seed=seed, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, **config,
    )
    trainer = GAMTrainer(model=model, args=args, train_dataset=rows)
    with count_training_examples() as counter, contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return trainer.model, counter[0]


def source_model(s: dict, scenario: Scenario, seed: int, work_dir: str) -> str:
    """The directory of the source model of `scenario` for `seed`, pretrained (once) on all images of its classes."""
    path = os.path.join(work_dir, f"source-{scenario.arch}-{''.join(map(str, scenario.source))}-seed{seed}")
    if not os.path.isdir(path):
        x, labels = digits_by_class(IMAGE_SIZE[scenario.arch])
        rows = examples(x, labels, class_indices(labels, scenario.source), scenario.source)
        torch.manual_seed(seed)
        model, _ = train(digits_model(scenario.arch, len(scenario.source)), rows, s["pretrain_epochs"],
                         PRETRAIN_LEARNING_RATE, seed, os.path.join(work_dir, "pretrain"), {"gam_method": "none"})
        model.save_pretrained(path)
    return path


@dataclass
class Task:
    """One scenario and seed: where the source model is and the rows to train, select and test on."""

    scenario: str
    seed: int
    model_dir: str
    train: list
    validation: list
    test: list


def make_task(s: dict, name: str, seed: int, work_dir: str) -> Task:
    scenario = SCENARIOS[name]
    x, labels = digits_by_class(IMAGE_SIZE[scenario.arch])
    test, validation, pool = split_target(labels, scenario.target, s["n_test"], s["n_validation"])
    train_rows = examples(x, labels, draw(pool, scenario.n_train, seed), scenario.target)
    if scenario.noise:
        train_rows = flip_labels(train_rows, scenario.noise, len(scenario.target), seed)
    return Task(name, seed, source_model(s, scenario, seed, work_dir), train_rows,
                examples(x, labels, validation, scenario.target), examples(x, labels, test, scenario.target))


# --------------------------------------------------------------------------------------------------
# One arm


def run_arm(s: dict, task: Task, arm: dict, out_dir: str) -> dict:
    """Fine-tune the task's source model with `arm`; returns its raw numbers."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    from hf_gam.compression import accuracy, compression_report
    from hf_gam.flatness import measure_flatness

    torch.manual_seed(task.seed)  # the new head: the same initial weights for every arm of the seed
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier", once per arm
    model = AutoModelForImageClassification.from_pretrained(task.model_dir, num_labels=len(SCENARIOS[task.scenario].target),
                                                            ignore_mismatched_sizes=True)
    hf_logging.set_verbosity(verbosity)
    start = time.perf_counter()
    model, examples_seen = train(model, task.train, s["epochs"], LEARNING_RATE, task.seed, out_dir, arm)
    seconds = time.perf_counter() - start
    test = [collate_fn(task.test)]
    report = compression_report(model, test, COMPRESSIONS, noise_draws=s["noise_draws"], seed=task.seed)
    flat = measure_flatness(model, collate_fn(task.train[: s["flat_examples"]]), eig_iters=s["eig_iters"],
                            metrics=("eigenvalue",))
    return dict(train=accuracy(model, [collate_fn(task.train)]), val=accuracy(model, [collate_fn(task.validation)]),
                test=report.pop("baseline"), compression=report, eig=flat["top_eigenvalue"], examples=examples_seen,
                seconds=seconds)


def run(s: dict, arms: dict[str, dict], log=print) -> dict:
    """Every scenario x seed x arm (arms of one seed in a shuffled order); returns the raw per-run rows."""
    runs = run_grid(
        "scenario", s["scenarios"], s["seeds"], arms,
        prepare=lambda name, seed, work_dir: make_task(s, name, seed, work_dir),
        run_one=lambda task, arm, seed, out_dir: run_arm(s, task, arm, out_dir),
        describe=lambda r: (f"train {r['train']:.3f} val {r['val']:.3f} test {r['test']:.3f} pruned_90 "
                            f"{r['compression']['pruned_90']:.3f} 2-bit {r['compression']['weights_2bit']:.3f} "
                            f"eig {r['eig']:.3g} examples {r['examples']}"),
        log=log,
    )
    return {"settings": s, "arms": arms, "runs": runs}


# --------------------------------------------------------------------------------------------------
# Tables


def _value(row: dict, key: str) -> float:
    return row[key] if key in ("test", "val", "train", "eig") else row["compression"][key]


def choose_sam(runs: list[dict], scenario: str, sam: list[str]) -> str | None:
    """The SAM radius with the best mean validation accuracy in `scenario`."""
    return choose(runs, scenario, sam, group_key="scenario")


def rows_of(runs: list[dict], scenario: str, arm: str) -> list[dict]:
    return [r for r in runs if r["scenario"] == scenario and r["arm"] == arm]


def _ci(values: list[float], fmt: str = "+.3f") -> str:
    return _interval_text(*t_interval(values), fmt)


COLUMNS = [("test", "test acc."), ("pruned_90", "90% pruned"), ("pruned_70", "70% pruned"),
           ("weights_2bit", "2-bit"), ("weights_3bit", "3-bit"), ("int8_dynamic", "int8 dyn."),
           ("noise_0.1", "noise 0.1")]


def scenario_table(runs: list[dict], scenario: str, arms: list[str], sam: list[str]) -> list[str]:
    chosen = choose_sam(runs, scenario, sam)
    adamw = rows_of(runs, scenario, "adamw")
    lines = [
        "", f"### {scenario}", "",
        f"SAM radius chosen on validation: `{chosen}` (marked *). Cells: mean over seeds; below it, the paired "
        "difference to AdamW with its 95% t-interval.", "",
        "| arm | passes / AdamW | " + " | ".join(title for _, title in COLUMNS) + " | top eig. / AdamW |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for arm in arms:
        rows = rows_of(runs, scenario, arm)
        if not rows:
            continue
        passes = statistics.mean(paired(rows, adamw, lambda r, a: r["examples"] / a["examples"]))
        cells = []
        for key, _ in COLUMNS:
            mean = statistics.mean(_value(r, key) for r in rows)
            diff = paired(rows, adamw, lambda r, a, k=key: _value(r, k) - _value(a, k))
            cells.append(f"{mean:.3f}" + ("" if arm == "adamw" else f"<br>{_ci(diff)}"))
        log_eig = t_interval(paired(rows, adamw, lambda r, a: math.log(r["eig"] / a["eig"])
                                    if r["eig"] > 0 and a["eig"] > 0 else math.nan))
        eig = "" if math.isnan(log_eig[0]) else f"{math.exp(log_eig[0]):.2f}"
        mark = " *" if arm == chosen else ""
        lines.append(f"| {arm}{mark} | {passes:.2f} | " + " | ".join(cells) + f" | {eig} |")
    return lines


def summary(runs: list[dict], scenarios: list[str], arms: list[str], sam: list[str]) -> dict[str, dict]:
    """Per arm (and `sam*`, the validation-chosen radius of each scenario), over the `scenarios` it ran in: mean paired
    Δ test and Δ 90%-pruned accuracy to AdamW, the pruning loss (test - 90% pruned) relative to AdamW's, passes."""
    out = {}
    for arm in list(arms) + ["sam*"]:
        d_test, d_pruned, losses, adamw_losses, passes = [], [], [], [], []
        for scenario in scenarios:
            name = choose_sam(runs, scenario, sam) if arm == "sam*" else arm
            rows, adamw = rows_of(runs, scenario, name), rows_of(runs, scenario, "adamw")
            if not rows or not adamw:
                continue
            d_test.append(statistics.mean(paired(rows, adamw, lambda r, a: r["test"] - a["test"])))
            d_pruned.append(statistics.mean(paired(rows, adamw, lambda r, a: _value(r, "pruned_90")
                                                   - _value(a, "pruned_90"))))
            losses.append(statistics.mean(r["test"] - _value(r, "pruned_90") for r in rows))
            adamw_losses.append(statistics.mean(r["test"] - _value(r, "pruned_90") for r in adamw))
            passes.append(statistics.mean(paired(rows, adamw, lambda r, a: r["examples"] / a["examples"])))
        if d_test:
            out[arm] = dict(d_test=statistics.mean(d_test), d_pruned=statistics.mean(d_pruned),
                            loss_ratio=statistics.mean(losses) / max(statistics.mean(adamw_losses), 1e-9),
                            passes=statistics.mean(passes), scenarios=len(d_test), per_scenario=d_test)
    return out


def summary_table(result: dict, scenarios: list[str], title: str) -> list[str]:
    arms, sam = list(result["arms"]), [a for a in builtin_arms()[1] if a in result["arms"]]
    rows = summary(result["runs"], scenarios, arms, sam)
    lines = ["", f"### {title}: {', '.join(scenarios)}", "",
             "Mean over the scenarios of the mean paired difference to AdamW; pruning loss = test accuracy minus "
             "accuracy after 90% pruning, relative to AdamW's.", "",
             "| arm | scenarios | passes / AdamW | Δ test | Δ test per scenario | Δ 90% pruned | pruning loss / AdamW's |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r['scenarios']} | {r['passes']:.2f} | {r['d_test']:+.4f} | "
                     f"{', '.join(f'{d:+.3f}' for d in r['per_scenario'])} | {r['d_pruned']:+.3f} | "
                     f"{r['loss_ratio']:.2f} |")
    return lines


def verdicts(result: dict, scenarios: list[str]) -> list[str]:
    """The bars: the defaults beat AdamW by 0.8 points on average, match SAM*, and lose at most half of AdamW's
    accuracy to 90% pruning; a cheap candidate (at most 2 passes per step, run in every scenario) keeps 80% of the
    defaults' accuracy and pruning gains and beats SAM* on both."""
    arms, sam = list(result["arms"]), [a for a in builtin_arms()[1] if a in result["arms"]]
    rows = summary(result["runs"], scenarios, arms, sam)
    if "gam" not in rows or "sam*" not in rows:
        return []
    gam, best_sam = rows["gam"], rows["sam*"]
    lines = ["", f"Bars over {', '.join(scenarios)}:",
             f"- defaults beat AdamW by >= 0.008 on average: {gam['d_test']:+.4f} -> "
             f"{'met' if gam['d_test'] >= 0.008 else 'NOT met'}",
             f"- defaults match or beat SAM*: {gam['d_test']:+.4f} vs {best_sam['d_test']:+.4f} -> "
             f"{'met' if gam['d_test'] >= best_sam['d_test'] else 'NOT met'}",
             f"- 90% pruning costs the defaults at most half of what it costs AdamW: {gam['loss_ratio']:.2f} -> "
             f"{'met' if gam['loss_ratio'] <= 0.5 else 'NOT met'}"]
    for arm, r in rows.items():
        if (arm in ("gam", "sam*", "adamw") or arm.startswith(("adamw", "sam_")) or r["passes"] > 2.05
                or r["scenarios"] < gam["scenarios"]):
            continue
        keeps_acc = r["d_test"] / gam["d_test"] if gam["d_test"] > 0 else math.nan
        keeps_prune = r["d_pruned"] / gam["d_pruned"] if gam["d_pruned"] > 0 else math.nan
        keeps = keeps_acc >= 0.8 and keeps_prune >= 0.8
        beats = r["d_test"] > best_sam["d_test"] and r["d_pruned"] > best_sam["d_pruned"]
        lines.append(f"- {arm} ({r['passes']:.2f} passes): keeps {keeps_acc:.0%} of the accuracy gain and "
                     f"{keeps_prune:.0%} of the pruning gain (80% of both: {'yes' if keeps else 'no'}); beats SAM* "
                     f"on both: {'yes' if beats else 'no'} -> {'meets the cheap bar' if keeps and beats else 'does not'}")
    return lines


def markdown(result: dict) -> str:
    s = result["settings"]
    arms, sam = list(result["arms"]), [a for a in builtin_arms()[1] if a in result["arms"]]
    scenarios = [n for n in s["scenarios"] if any(r["scenario"] == n for r in result["runs"])]
    seeds = sorted({r["seed"] for r in result["runs"]})
    lines = [f"Seeds {seeds}; fine-tuning {s['epochs']} epochs (pretraining {s['pretrain_epochs']}), AdamW lr "
             f"{LEARNING_RATE}, weight decay {WEIGHT_DECAY}, batch {BATCH}, cosine, 5% warm-up, clipping at 1."]
    for scenario in scenarios:
        lines += scenario_table(result["runs"], scenario, arms, sam)
    development = [n for n in scenarios if n not in HELD_OUT]
    held_out = [n for n in scenarios if n in HELD_OUT]
    if development:
        lines += summary_table(result, development, "Summary") + verdicts(result, development)
    if held_out:
        lines += summary_table(result, held_out, "Held out") + verdicts(result, held_out)
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """The runs of several saved results in one (settings and arms of the first, scenarios and arms united)."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    merged = copy.deepcopy(results[0])
    for other in results[1:]:
        merged["runs"] += other["runs"]
        merged["arms"].update(other["arms"])
        merged["settings"]["scenarios"] += [n for n in other["settings"]["scenarios"]
                                            if n not in merged["settings"]["scenarios"]]
    return merged


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets")
    parser.add_argument("--scenarios", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--arms", default=None, help="comma-separated arms to run (adamw always runs)")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="add an arm: GAMConfig keyword arguments (and epochs_x); repeatable")
    parser.add_argument("--json", default=None, help="write every per-seed number to this file")
    parser.add_argument("--tables", nargs="+", default=None, metavar="JSON",
                        help="print the tables of saved runs (merged); train nothing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tables:
        result = merge(args.tables)
        print(markdown(result))
        return result
    torch.set_num_threads(args.threads)
    s = copy.deepcopy(SETTINGS["quick" if args.quick else "full"])
    if args.scenarios:
        s["scenarios"] = args.scenarios.split(",")
        unknown = set(s["scenarios"]) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    arms, _ = builtin_arms()
    for spec in args.arm:
        name, config = parse_arm(spec)
        arms[name] = config
    if args.quick and args.arms is None:
        args.arms = "gam,sam_0.05,r3"
    if args.arms is not None:
        wanted = ["adamw"] + [a for a in args.arms.split(",") if a != "adamw"]
        wanted += [parse_arm(spec)[0] for spec in args.arm if parse_arm(spec)[0] not in wanted]
        unknown = [a for a in wanted if a not in arms]
        if unknown:
            parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(arms)}")
        arms = {a: arms[a] for a in wanted}
    start = time.perf_counter()
    result = run(s, arms, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s, {args.threads} thread(s).")
    return result


if __name__ == "__main__":
    main()
