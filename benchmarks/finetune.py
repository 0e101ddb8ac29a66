"""Does GAM pay in fine-tuning? AdamW, SAM and GAM settings fine-tuning pretrained models on scikit-learn's digits.

Every scenario starts from source models pretrained (AdamW, the stock step) on some digit classes, one per seed,
saved with `save_pretrained`, and fine-tunes them on the other classes, loaded with `from_pretrained` and a new
5-way head, as a user of the Trainer does:

  vit_500          a ViT (patch 2, 4 layers, hidden 64) pretrained on digits 0-4, fine-tuned on 496 images of 5-9
  vit_100          the same, fine-tuned on 100 images (a seeded subset)
  resnet_500       a ResNet (`ResNetForImageClassification`, 2 stages, BatchNorm) on the digits resized to 16x16
  vit_500_noisy    vit_500 with 20% of the fine-tuning labels flipped to another class (validation and test clean)
  vit_500_swapped  the class halves swapped: pretrained on 5-9, fine-tuned on 0-4. Held out: the tables summarise it
                   apart from the four development scenarios, so it checks on data they did not see what was
                   chosen on them (the cheap setting)
  vit_narrow_500   vit_500 with a narrower ViT (hidden 32, MLP 64, 2 heads: a quarter of the weights), where fewer
                   redundant weights make the deployable formats cost accuracy

The images of the fine-tuning classes are split once (seed 0): 300 for test, 100 for validation, the rest (496 of
the digits 5-9, 501 of 0-4) the pool the training images come from. Fine-tuning: AdamW lr 1e-3, weight decay 0.05,
batch 32, 40 epochs (AdamW fits its set in the first few), cosine decay, 5% warm-up, clipping at 1; the arms differ
only in their `gam_*` values and `epochs_x` (a multiple of the epochs).

Arms (`--arms` picks a subset; `--arm NAME=KEY=VALUE,...` adds one; two arms with the same values are refused):
  adamw, adamw_2x, adamw_4x   the stock step for 1x, 2x and 4x the epochs: AdamW given the compute of SAM and GAM
  sam_<rho>                   SAM with constant radius rho (0.02, 0.05, 0.1); the validation-best one is `sam*`
  gam                         `GAMConfig()`'s defaults
  pretrain_gam                `hf_gam.PRETRAIN_GAM` (the late, ramped setting for training from scratch)
  i2, i3, r3, r4, late_0.67, bf_0.25   candidates for a cheap setting: GAM every 2nd or 3rd step
                              (`gam_interval`, 2.5 and 2 passes per step), reuse of the last correction for 3 or 4
                              steps (`gam_reuse_interval`; `r3` is `hf_gam.CHEAP_GAM`), GAM from 2/3 of the run with
                              constant radii (`gam_start=0.667`), passes on a quarter of the batch
                              (`gam_batch_fraction=0.25`). `cheap_gam` is added only when `CHEAP_GAM` differs from
                              all of them.
  NAME@Bx                     arm NAME at B times AdamW's compute (B = 1, 2, 4): its epochs scaled by
                              `epochs_x = B / passes per step`, e.g. `gam@1x` (10 epochs of 4 passes), `sam_0.1@1x`
                              (20 epochs), `r3@1x` (20 epochs), `adamw` itself being `adamw@1x`

Reported per scenario and arm, over seeds (arms of one seed share the source model, the fine-tuning images and
the new head, and run in a shuffled order): test accuracy; accuracy after compression (`hf_gam.compression`, on
the test split: 90% and 70% global magnitude pruning, 2- and 3-bit round-to-nearest weights, int8 dynamic
quantization, weight noise 0.1); the top Hessian eigenvalue of the training loss (256 training examples, 10 power
iterations); forward/backward passes relative to AdamW (examples forwarded in training mode, counted); paired
differences to AdamW of the same seed with 95% t-intervals. A summary table averages the paired differences over
scenarios and checks the bars the defaults and the cheap setting are held to. At equal compute, arms are grouped
by the passes they spent (1x, 2x, 4x AdamW's) and compared with AdamW of that budget (`adamw`, `adamw_2x`,
`adamw_4x`) and with SAM* chosen on validation among the SAM arms of that budget.

Deployable formats: `--save_models DIR` keeps every fine-tuned model (`DIR/<scenario>/seed<k>/<arm>`, with its
numbers in `run.json`); `--measure DIR` measures saved models again, without retraining, in `--formats` (default
int8, int4, mlp:0.25, mlp:0.5, mlp:0.75, mlp:0.9, mlp:0.5+int8; `mlp:F` also after a recovery fine-tune of `--recover_epochs` epochs
with the arm's own step) and writes the size on disk of each format (`hf_gam.compression.export`).

`--json` records the package versions and the CPU kernels torch uses (`settings.environment`): another machine
does not reproduce the runs digit for digit, so its seeds do not pair with these, and `--tables` warns when it
merges results of different environments.

    python benchmarks/finetune.py --json ft.json                       # everything: 6 scenarios x 5 seeds
    python benchmarks/finetune.py --scenarios vit_500,vit_100 --json a.json   # a part (runs in parallel merge)
    python benchmarks/finetune.py --tables a.json b.json               # tables of saved runs (merged)
    python benchmarks/finetune.py --arms sam_0.1@1x,gam@1x,gam@2x --save_models models --json b.json
    python benchmarks/finetune.py --measure models --json formats.json # deployable formats of the saved models
    python benchmarks/finetune.py --tables a.json --plot compute.png   # accuracy against passes spent
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
import tempfile
import time
import warnings
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
    "full": dict(seeds=[0, 1, 2, 3, 4], scenarios=["vit_500", "vit_100", "resnet_500", "vit_500_noisy", "vit_500_swapped",
                                                   "vit_narrow_500"],
                 pretrain_epochs=30, epochs=40, n_test=300, n_validation=100, flat_examples=256, eig_iters=10,
                 noise_draws=3, recover_epochs=2),
    "quick": dict(seeds=[0], scenarios=["vit_100", "resnet_500"], pretrain_epochs=2, epochs=2, n_test=300,
                  n_validation=100, flat_examples=64, eig_iters=3, noise_draws=1, recover_epochs=1),
}
HELD_OUT = ("vit_500_swapped",)
"""Summarised apart from the development scenarios: what was chosen on those is checked here."""
DEPLOYMENT = ("vit_narrow_500",)
"""Summarised apart too: a scenario made for the deployable formats, not for the choice of settings."""
LEARNING_RATE, PRETRAIN_LEARNING_RATE, WEIGHT_DECAY, BATCH = 1e-3, 2e-3, 0.05, 32
RECOVER_LEARNING_RATE = 1e-4
"""The recovery fine-tune after `mlp:F` starts from a trained model: a tenth of the fine-tuning rate."""
SAM_RHO = (0.02, 0.05, 0.1)
COMPRESSIONS = ("prune:0.9", "prune:0.7", "rtn:2", "rtn:3", "int8_dynamic", "noise:0.1")
FORMATS = ("int8", "int4", "mlp:0.25", "mlp:0.5", "mlp:0.75", "mlp:0.9", "mlp:0.5+int8")
"""The deployable formats `--measure` measures by default (`mlp:F` also after a recovery fine-tune)."""
CANDIDATES = {
    "i2": {"gam_interval": 2},
    "i3": {"gam_interval": 3},
    "r3": {"gam_reuse_interval": 3},
    "r4": {"gam_reuse_interval": 4},
    "late_0.67": {"gam_start": 0.667},
    "bf_0.25": {"gam_batch_fraction": 0.25},
}
"""Cheap-setting candidates, each on top of `GAMConfig()`'s defaults."""
PASSES_PER_STEP = {"adamw": 1, "gam": 4, "pretrain_gam": 1.75, "cheap_gam": 2, "i2": 2.5, "i3": 2, "r3": 2,
                   "r4": 1.75, "late_0.67": 2, "bf_0.25": 2, **{f"sam_{rho:g}": 2 for rho in SAM_RHO}}
"""Forward/backward passes per step of the built-in arms (the counted examples check them), for `NAME@Bx`."""
BUDGETS = (1, 2, 4)
"""Compute budgets, in multiples of AdamW's passes over its 40 epochs."""


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
    "vit_narrow_500": Scenario("vit_narrow", 500),
}


def image_size(arch: str) -> int:
    return IMAGE_SIZE["vit" if arch == "vit_narrow" else arch]


def new_model(arch: str, num_labels: int):
    """`digits_model(arch)`, or for "vit_narrow" the digits ViT at half its width (hidden 32, MLP 64, 2 heads)."""
    if arch != "vit_narrow":
        return digits_model(arch, num_labels)
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def at_budget(name: str, arms: dict[str, dict], budget: float) -> dict:
    """Arm `name` with its epochs scaled so that it spends `budget` times AdamW's passes."""
    config = dict(arms[name])
    config["epochs_x"] = budget / PASSES_PER_STEP[name]
    return config


def builtin_arms() -> tuple[dict[str, dict], list[str]]:
    """The arms and the names of the SAM sweep at its own budget (2 passes per step, 40 epochs)."""
    from hf_gam import CHEAP_GAM, PRETRAIN_GAM

    arms = {
        "adamw": {"gam_method": "none"},
        "adamw_2x": {"gam_method": "none", "epochs_x": 2},
        "adamw_4x": {"gam_method": "none", "epochs_x": 4},
        "gam": {},
        "pretrain_gam": dict(PRETRAIN_GAM),
        **{name: dict(config) for name, config in CANDIDATES.items()},
    }
    if dict(CHEAP_GAM) not in arms.values():
        arms["cheap_gam"] = dict(CHEAP_GAM)
    sam = [f"sam_{rho:g}" for rho in SAM_RHO]
    for name, rho in zip(sam, SAM_RHO):
        arms[name] = {"gam_method": "sam", "gam_grad_rho": rho}
    for name in [n for n in arms if n in PASSES_PER_STEP and n != "adamw"]:
        for budget in BUDGETS:
            if budget != PASSES_PER_STEP[name]:
                arms[f"{name}@{budget}x"] = at_budget(name, arms, budget)
    return arms, sam


def duplicate_arms(arms: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs of arms with the same values (the same run twice)."""
    names = list(arms)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if {**arms[a], "epochs_x": arms[a].get("epochs_x", 1)} == {**arms[b], "epochs_x": arms[b].get("epochs_x", 1)}]


def method(arm: str) -> str:
    """The method an arm runs, whatever its budget: adamw_2x -> adamw, gam@1x -> gam, sam_0.1@1x -> sam_0.1."""
    base = arm.split("@")[0]
    return "adamw" if base in ("adamw", "adamw_2x", "adamw_4x") else base


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
        x, labels = digits_by_class(image_size(scenario.arch))
        rows = examples(x, labels, class_indices(labels, scenario.source), scenario.source)
        torch.manual_seed(seed)
        model, _ = train(new_model(scenario.arch, len(scenario.source)), rows, s["pretrain_epochs"],
                         PRETRAIN_LEARNING_RATE, seed, os.path.join(work_dir, "pretrain"), {"gam_method": "none"})
        model.save_pretrained(path)
    return path


@dataclass
class Task:
    """One scenario and seed: where the source model is and the rows to train, select and test on."""

    scenario: str
    seed: int
    model_dir: str | None
    train: list
    validation: list
    test: list


def make_task(s: dict, name: str, seed: int, work_dir: str | None) -> Task:
    """The task of scenario `name` and `seed`; its source model is pretrained in `work_dir` (none when None)."""
    scenario = SCENARIOS[name]
    x, labels = digits_by_class(image_size(scenario.arch))
    test, validation, pool = split_target(labels, scenario.target, s["n_test"], s["n_validation"])
    train_rows = examples(x, labels, draw(pool, scenario.n_train, seed), scenario.target)
    if scenario.noise:
        train_rows = flip_labels(train_rows, scenario.noise, len(scenario.target), seed)
    model_dir = None if work_dir is None else source_model(s, scenario, seed, work_dir)
    return Task(name, seed, model_dir, train_rows, examples(x, labels, validation, scenario.target),
                examples(x, labels, test, scenario.target))


# --------------------------------------------------------------------------------------------------
# One arm


def model_path(save_dir: str, scenario: str, seed: int, arm: str) -> str:
    return os.path.join(save_dir, scenario, f"seed{seed}", arm)


def run_arm(s: dict, task: Task, arm: dict, out_dir: str, formats: tuple = (), save: str | None = None) -> dict:
    """Fine-tune the task's source model with `arm`; returns its raw numbers. With `save`, the model is saved there
    (`save_pretrained`, and the numbers in `run.json`)."""
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
    row = dict(train=accuracy(model, [collate_fn(task.train)]), val=accuracy(model, [collate_fn(task.validation)]),
               test=report.pop("baseline"), compression=report, eig=flat["top_eigenvalue"], examples=examples_seen,
               seconds=seconds)
    if formats:
        row["compression"].update(measure_formats(s, task, model, arm, formats, out_dir))
    if save is not None:
        model.save_pretrained(save)
        with open(os.path.join(save, "run.json"), "w") as f:
            json.dump(dict(scenario=task.scenario, seed=task.seed, config=arm, **row), f, indent=1)
    return row


def recovered(name: str) -> str:
    """The report key of format `name` after the recovery fine-tune: mlp_0.5 -> mlp_0.5_rec."""
    return f"{name}_rec"


def measure_formats(s: dict, task: Task, model, arm: dict, formats, out_dir: str) -> dict[str, float]:
    """Test accuracy of `model` in each deployable format (a copy each; `model` is left as it was), and for `mlp:F`
    (alone or followed by another format) also after a recovery fine-tune: the smaller model trained for
    `recover_epochs` epochs with the arm's own step at `RECOVER_LEARNING_RATE` (once per F), then the format that
    follows. A format that does not apply to the architecture (`mlp:F` on a ResNet) is left out."""
    from hf_gam.compression import Compression, accuracy

    test = [collate_fn(task.test)]
    out, recovered_models = {}, {}
    own_step = {k: v for k, v in arm.items() if k != "epochs_x"}
    for spec in formats:
        compression = Compression.parse(spec)
        try:
            compressed = compression.apply(model)
        except (ValueError, NotImplementedError, AssertionError):  # torchao asserts on widths its groups do not divide
            continue
        out[compression.name] = accuracy(compressed, test)
        if compression.kind == "mlp":
            if compression.level not in recovered_models:
                torch.manual_seed(task.seed)
                small = Compression("mlp", compression.level).apply(model)
                recovered_models[compression.level], _ = train(
                    small, task.train, s["recover_epochs"], RECOVER_LEARNING_RATE, task.seed,
                    tempfile.mkdtemp(dir=out_dir), own_step)
            small = recovered_models[compression.level]
            if compression.then is not None:
                small = compression.then.apply(small)
            out[recovered(compression.name)] = accuracy(small, test)
    return out


def format_sizes(model_dir: str, formats, out_dir: str) -> dict[str, dict]:
    """Weights on disk (MB) and parameter count of the float model (`float`) and of each format, exported from the
    saved model in `model_dir` by `hf_gam.compression.export` (empty when the package has no export)."""
    from transformers import AutoModelForImageClassification

    import hf_gam.compression as compression

    if not hasattr(compression, "export"):
        return {}
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    sizes = {}
    for spec in formats:
        name = compression.Compression.parse(spec).name
        try:
            report = compression.export(model, spec, os.path.join(out_dir, name), latency_repeats=0,
                                        log=lambda message: None)
        except (ValueError, NotImplementedError):
            continue
        sizes["float"] = dict(disk_mb=report["original"]["weights_bytes"] / 1e6,
                              parameters=report["original"]["parameters"])
        sizes[name] = dict(disk_mb=report["compressed"]["weights_bytes"] / 1e6,
                           parameters=report["compressed"]["parameters"], size_ratio=report["size_ratio"])
    return sizes


def environment() -> dict[str, str]:
    """What the numbers depend on beyond the code: the versions of the numerical packages and the CPU kernels torch
    dispatches to (`AVX2`, `AVX512`, ...). Runs of different environments do not reproduce each other digit for
    digit, so their seeds do not pair."""
    import accelerate
    import numpy
    import sklearn
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run(s: dict, arms: dict[str, dict], log=print, formats: tuple = (), save_dir: str | None = None) -> dict:
    """Every scenario x seed x arm (arms of one seed in a shuffled order); returns the raw per-run rows. With
    `save_dir`, every fine-tuned model is kept under it (`model_path`)."""
    names = {id(config): name for name, config in arms.items()}

    def run_one(task, arm, seed, out_dir):
        save = None if save_dir is None else model_path(save_dir, task.scenario, seed, names[id(arm)])
        return run_arm(s, task, arm, out_dir, formats, save)

    runs = run_grid(
        "scenario", s["scenarios"], s["seeds"], arms,
        prepare=lambda name, seed, work_dir: make_task(s, name, seed, work_dir),
        run_one=run_one,
        describe=lambda r: (f"train {r['train']:.3f} val {r['val']:.3f} test {r['test']:.3f} pruned_90 "
                            f"{r['compression']['pruned_90']:.3f} 2-bit {r['compression']['weights_2bit']:.3f} "
                            f"eig {r['eig']:.3g} examples {r['examples']}"),
        log=log,
    )
    return {"settings": dict(s, environment=environment()), "arms": arms, "runs": runs}


def saved_runs(save_dir: str) -> list[dict]:
    """The `run.json` of every model saved under `save_dir`, each with its `arm` and `path`."""
    rows = []
    for scenario in sorted(os.listdir(save_dir)):
        for seed_dir in sorted(os.listdir(os.path.join(save_dir, scenario))):
            for arm in sorted(os.listdir(os.path.join(save_dir, scenario, seed_dir))):
                path = os.path.join(save_dir, scenario, seed_dir, arm)
                if os.path.isfile(os.path.join(path, "run.json")):
                    with open(os.path.join(path, "run.json")) as f:
                        rows.append(dict(json.load(f), arm=arm, path=path))
    return rows


def measure(s: dict, save_dir: str, formats, scenarios=None, seeds=None, arms=None, log=print) -> dict:
    """The deployable formats of the models saved under `save_dir` (no retraining): the saved numbers of each run
    with the accuracy in each format added to its `compression`, and the size on disk of each format per
    scenario (`sizes`)."""
    from transformers import AutoModelForImageClassification

    saved = [r for r in saved_runs(save_dir) if (scenarios is None or r["scenario"] in scenarios)
             and (seeds is None or r["seed"] in seeds) and (arms is None or r["arm"] in arms)]
    runs, tasks, sizes, configs = [], {}, {}, {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        for i, row in enumerate(saved):
            key = (row["scenario"], row["seed"])
            if key not in tasks:
                tasks[key] = make_task(s, row["scenario"], row["seed"], None)
            if row["scenario"] not in sizes:
                sizes[row["scenario"]] = format_sizes(row["path"], formats, os.path.join(work_dir, row["scenario"]))
            model = AutoModelForImageClassification.from_pretrained(row["path"])
            out = {k: v for k, v in row.items() if k != "path"}
            out["compression"] = {**row["compression"],
                                  **measure_formats(s, tasks[key], model, row["config"], formats, work_dir)}
            runs.append(out)
            configs[row["arm"]] = row["config"]
            log(f"[{time.perf_counter() - start:6.0f} s] {i + 1}/{len(saved)} {row['scenario']} seed {row['seed']} "
                f"{row['arm']}: " + " ".join(f"{k} {out['compression'][k]:.3f}" for k in out["compression"]
                                              if k not in row["compression"]))
    settings = dict(s, scenarios=[n for n in SCENARIOS if n in sizes], formats=list(formats))
    return {"settings": settings, "arms": configs, "runs": runs, "sizes": sizes}


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
    accuracy to 90% pruning; a cheap candidate (at most 2 passes per step, run in every scenario, at the common
    epochs: no `NAME@Bx` arm) keeps 80% of the defaults' accuracy and pruning gains and beats SAM* on both, on the
    averages over the scenarios. `cheap_answer` holds a cheap setting to the stricter bar (per scenario, held out)."""
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
        if (arm in ("gam", "sam*", "adamw") or arm.startswith(("adamw", "sam_")) or "@" in arm or r["passes"] > 2.05
                or r["scenarios"] < gam["scenarios"]):  # a NAME@Bx arm runs other epochs: not a setting
            continue
        keeps_acc = r["d_test"] / gam["d_test"] if gam["d_test"] > 0 else math.nan
        keeps_prune = r["d_pruned"] / gam["d_pruned"] if gam["d_pruned"] > 0 else math.nan
        keeps = keeps_acc >= 0.8 and keeps_prune >= 0.8
        beats = r["d_test"] > best_sam["d_test"] and r["d_pruned"] > best_sam["d_pruned"]
        lines.append(f"- {arm} ({r['passes']:.2f} passes): keeps {keeps_acc:.0%} of the accuracy gain and "
                     f"{keeps_prune:.0%} of the pruning gain (80% of both: {'yes' if keeps else 'no'}); beats SAM* "
                     f"on both: {'yes' if beats else 'no'} -> {'meets the bar on the averages' if keeps and beats else 'does not'}")
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
    development = [n for n in scenarios if n not in HELD_OUT + DEPLOYMENT]
    held_out = [n for n in scenarios if n in HELD_OUT]
    deployment = [n for n in scenarios if n in DEPLOYMENT]
    if development:
        lines += summary_table(result, development, "Summary") + verdicts(result, development)
    if held_out:
        lines += summary_table(result, held_out, "Held out") + verdicts(result, held_out)
    if deployment:
        lines += summary_table(result, deployment, "Deployment scenario")
    if development:
        lines += cheap_answer(result, development, held_out)
    for scenario in scenarios:
        lines += equal_compute_table(result, scenario)
    for title, group in (("Development", development), ("Held out", held_out), ("Deployment scenario", deployment)):
        if group:
            lines += equal_compute_summary(result, group, title)
    for scenario in scenarios:
        lines += format_table(result, scenario)
    for title, group in (("Development", development), ("Held out", held_out), ("Deployment scenario", deployment)):
        lines += format_summary(result, group, title) + format_summary(result, group, title, loss=True)
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """The runs of several saved results in one (settings and arms of the first, scenarios, arms, formats and sizes
    united). A run (scenario, seed, arm) saved in more than one is taken from the first that has it, with the
    compressions only the others measured added (a second `--measure` pass with other formats). Results that
    recorded different environments (`environment()`) are merged with a warning: their runs of one seed do not
    pair."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    environments = {json.dumps(r["settings"]["environment"], sort_keys=True): path
                    for r, path in zip(results, paths) if "environment" in r["settings"]}
    if len(environments) > 1:
        warnings.warn("the results were run in different environments, so runs of one seed in them do not pair: "
                      + "; ".join(f"{path}: {env}" for env, path in environments.items()), stacklevel=2)
    merged = copy.deepcopy(results[0])
    seen = {(r["scenario"], r["seed"], r["arm"]): r for r in merged["runs"]}
    for other in results[1:]:
        for row in other["runs"]:
            key = (row["scenario"], row["seed"], row["arm"])
            if key in seen:
                seen[key]["compression"].update({k: v for k, v in row["compression"].items()
                                                 if k not in seen[key]["compression"]})
            else:
                seen[key] = row
                merged["runs"].append(row)
        merged["arms"].update({k: v for k, v in other["arms"].items() if k not in merged["arms"]})
        merged["settings"]["scenarios"] += [n for n in other["settings"]["scenarios"]
                                            if n not in merged["settings"]["scenarios"]]
        if "formats" in other["settings"]:
            formats = merged["settings"].setdefault("formats", [])
            formats += [f for f in other["settings"]["formats"] if f not in formats]
        for scenario, sizes in other.get("sizes", {}).items():
            known = merged.setdefault("sizes", {}).setdefault(scenario, {})
            known.update({k: v for k, v in sizes.items() if k not in known})
    return merged


# --------------------------------------------------------------------------------------------------
# Equal compute


def passes_spent(runs: list[dict], scenario: str, arm: str) -> float | None:
    """Mean over seeds of the arm's examples forwarded in training over AdamW's (40 epochs) of the same seed."""
    values = paired(rows_of(runs, scenario, arm), rows_of(runs, scenario, "adamw"),
                    lambda r, a: r["examples"] / a["examples"])
    return statistics.mean(values) if values else None


def budget_of(runs: list[dict], scenario: str, arm: str, tolerance: float = 0.1) -> int | None:
    """The budget (1, 2 or 4 times AdamW's passes) the arm spent in `scenario`, None when it is not within 10% of
    one."""
    spent = passes_spent(runs, scenario, arm)
    for budget in BUDGETS:
        if spent is not None and abs(spent / budget - 1) <= tolerance:
            return budget
    return None


def arms_at(runs: list[dict], scenario: str, arms: list[str], budget: int) -> dict[str, str]:
    """{method: arm} of the arms that spent `budget` in `scenario`; the SAM radii as one method, `sam*`, the radius
    of that budget with the best mean validation accuracy."""
    present = [a for a in arms if rows_of(runs, scenario, a) and budget_of(runs, scenario, a) == budget]
    sam = [a for a in present if method(a).startswith("sam_")]
    out = {method(a): a for a in present if not method(a).startswith("sam_")}
    if sam:
        out["sam*"] = choose_sam(runs, scenario, sam)
    return out


def _diff(runs, scenario, arm, reference, key) -> list[float]:
    return paired(rows_of(runs, scenario, arm), rows_of(runs, scenario, reference),
                  lambda r, a: _value(r, key) - _value(a, key))


def _epochs_text(s: dict, config: dict) -> str:
    return f"{s['epochs'] * config.get('epochs_x', 1):g}"


def equal_compute_table(result: dict, scenario: str) -> list[str]:
    runs, arms, s = result["runs"], list(result["arms"]), result["settings"]
    lines = ["", f"### {scenario}: equal compute", "",
             "Per budget (passes spent over AdamW's in 40 epochs), each arm against AdamW of the same budget; SAM* is "
             "the radius chosen on validation among those run at that budget. Cells: mean over seeds; below it, the "
             "paired difference with its 95% t-interval.", "",
             "| budget | arm | epochs | passes spent | test acc. | Δ test | 90% pruned | Δ 90% pruned | 70% pruned | Δ 70% pruned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        at = arms_at(runs, scenario, arms, budget)
        reference = at.get("adamw")
        if reference is None:
            continue
        for name, arm in at.items():
            label = f"sam* (`{arm}`)" if name == "sam*" else arm
            cells = []
            for key in ("test", "pruned_90", "pruned_70"):
                mean = statistics.mean(_value(r, key) for r in rows_of(runs, scenario, arm))
                cells += [f"{mean:.3f}", "" if arm == reference else _ci(_diff(runs, scenario, arm, reference, key))]
            lines.append(f"| {budget}x | {label} | {_epochs_text(s, result['arms'][arm])} | "
                         f"{passes_spent(runs, scenario, arm):.2f} | " + " | ".join(cells) + " |")
    return lines


def equal_compute_summary(result: dict, scenarios: list[str], title: str) -> list[str]:
    """Per budget and method: the mean over `scenarios` of the mean paired difference to AdamW of the same budget
    (and to SAM* of the same budget), and the per-scenario values; methods run in every scenario only."""
    runs, arms = result["runs"], list(result["arms"])
    lines = ["", f"### {title} at equal compute: {', '.join(scenarios)}", "",
             "Mean over the scenarios of the mean paired difference (each scenario's per-seed values pooled for the "
             "95% t-interval, n = scenarios x seeds) to AdamW and to SAM* of the same budget.", "",
             "| budget | method | Δ test vs AdamW | per scenario | Δ 90% pruned vs AdamW | per scenario | Δ test vs SAM* | Δ 90% pruned vs SAM* |",
             "|---|---|---|---|---|---|---|---|"]
    for budget in BUDGETS:
        per = {scenario: arms_at(runs, scenario, arms, budget) for scenario in scenarios}
        methods = [m for m in per[scenarios[0]] if all(m in per[sc] for sc in scenarios)] if scenarios else []
        if "adamw" not in methods:
            continue
        for m in methods:
            if m == "adamw":
                continue
            cells = []
            for reference, keys in (("adamw", ("test", "pruned_90")), ("sam*", ("test", "pruned_90"))):
                for key in keys:
                    if reference == "sam*" and ("sam*" not in methods or m == "sam*"):
                        cells.append("")
                        continue
                    diffs = [_diff(runs, sc, per[sc][m], per[sc][reference], key) for sc in scenarios]
                    pooled = [d for values in diffs for d in values]
                    mean = statistics.mean(statistics.mean(values) for values in diffs)
                    low, high = t_interval(pooled)[1:]
                    cells.append(_interval_text(mean, low, high, "+.3f"))
                    if reference == "adamw":
                        cells.append(", ".join(f"{statistics.mean(v):+.3f}" for v in diffs))
            name = "sam*" if m == "sam*" else m
            lines.append(f"| {budget}x | {name} | " + " | ".join(cells) + " |")
    return lines


def cheap_answer(result: dict, development: list[str], held_out: list[str]) -> list[str]:
    """The bar for a cheap setting: at most 2 passes per step, it beats SAM* (40 epochs, 2 passes per step) on test
    accuracy and on 90%-pruned accuracy averaged over the development scenarios and in at least 3 of 4 of them (each
    measure), and on both in the held-out scenarios. The cheapest that passes wins; otherwise the closest (the
    largest of the smaller of its two average margins) is named. Each line also gives the arm's validation accuracy
    (mean over the development scenarios), by which to choose among the radii of one family."""
    runs, arms = result["runs"], list(result["arms"])
    sam = [a for a in builtin_arms()[1] if a in result["arms"]]

    def margins(arm, scenarios):
        out = {"test": [], "pruned_90": []}
        for sc in scenarios:
            best = choose_sam(runs, sc, sam)
            if best is None or not rows_of(runs, sc, arm):
                return None
            for key in out:
                out[key].append(statistics.mean(_diff(runs, sc, arm, best, key)))
        return out

    lines = ["", "Cheap setting (at most 2 passes per step, 40 epochs) against SAM* at 40 epochs, over "
             f"{', '.join(development)}, held out {', '.join(held_out) or 'none'}:"]
    verdict = []
    for arm in arms:
        if method(arm) in ("adamw", "gam") or method(arm).startswith("sam_") or "@" in arm:
            continue
        passes = [passes_spent(runs, sc, arm) for sc in development]
        if any(p is None for p in passes) or statistics.mean(passes) > 2.05:
            continue
        dev, out = margins(arm, development), margins(arm, held_out) if held_out else {"test": [], "pruned_90": []}
        if dev is None or out is None:
            continue
        mean = {k: statistics.mean(v) for k, v in dev.items()}
        wins = {k: sum(v > 0 for v in dev[k]) for k in dev}
        need = math.ceil(0.75 * len(development))
        holds = all(v > 0 for k in out for v in out[k])
        passed = all(mean[k] > 0 and wins[k] >= need for k in dev) and holds
        # Printed to choose among the settings of one family (radii) without looking at test accuracy.
        val = statistics.mean(statistics.mean(r["val"] for r in rows_of(runs, sc, arm)) for sc in development)
        verdict.append((passed, statistics.mean(passes), min(mean.values()), arm))
        lines.append(f"- {arm} ({statistics.mean(passes):.2f} passes): Δ test vs SAM* {mean['test']:+.4f} (ahead in "
                     f"{wins['test']} of {len(development)}), Δ 90% pruned {mean['pruned_90']:+.3f} (ahead in "
                     f"{wins['pruned_90']}); held out "
                     + ", ".join(f"{k} {statistics.mean(v):+.3f}" for k, v in out.items() if v)
                     + f"; development validation accuracy {val:.3f} -> {'meets the bar' if passed else 'does not'}")
    winners = sorted(v for v in verdict if v[0])
    if winners:
        lines.append(f"- cheapest that meets the bar: {winners[0][3]} ({winners[0][1]:.2f} passes)")
    elif verdict:
        closest = max(verdict, key=lambda v: v[2])
        lines.append(f"- none meets the bar; closest: {closest[3]} (its smaller average margin {closest[2]:+.4f})")
    return lines


# --------------------------------------------------------------------------------------------------
# Deployable formats (`--measure`)

DEPLOY_ARMS = ("adamw", "adamw_2x", "sam*", "gam", "r3", "cheap_gam", "gam@1x", "r3@1x")
"""The arms of the deployable-format tables, in their order (those that ran); sam* is the validation-chosen radius."""


def format_keys(result: dict) -> list[tuple[str, str]]:
    """(report key, title) of the deployable formats of a `--measure` result: each format, then for `mlp:F` its
    recovered counterpart."""
    from hf_gam.compression import Compression

    keys = []
    for spec in result["settings"].get("formats", []):
        compression = Compression.parse(spec)
        keys.append((compression.name, compression.name))
        if compression.kind == "mlp":
            keys.append((recovered(compression.name), f"{compression.name} + recovery"))
    return keys


def _deploy_arms(runs: list[dict], scenario: str) -> dict[str, str]:
    sam = [a for a in builtin_arms()[1] if rows_of(runs, scenario, a)]
    out = {}
    for label in DEPLOY_ARMS:
        arm = choose_sam(runs, scenario, sam) if label == "sam*" else label
        if arm is not None and rows_of(runs, scenario, arm):
            out[label] = arm
    return out


def _present(runs, scenario, key) -> bool:
    return all(key in r["compression"] for r in rows_of(runs, scenario, "adamw")) and bool(rows_of(runs, scenario, "adamw"))


def format_table(result: dict, scenario: str) -> list[str]:
    runs = result["runs"]
    keys = [(k, t) for k, t in format_keys(result) if _present(runs, scenario, k)]
    if not keys:
        return []
    at = _deploy_arms(runs, scenario)
    sizes = result.get("sizes", {}).get(scenario, {})
    lines = ["", f"### {scenario}: deployable formats", "",
             f"Test accuracy in each format; recovery: {result['settings']['recover_epochs']:g} epoch(s) of fine-tuning "
             f"of the smaller model with the arm's own step, lr {RECOVER_LEARNING_RATE:g}. Cells: mean over seeds; "
             "below it, the paired difference to AdamW with its 95% t-interval.", "",
             "| arm | test acc. | " + " | ".join(t for _, t in keys) + " |", "|---|---|" + "---|" * len(keys)]
    if sizes:
        lines.append("| size on disk (MB) | " + (f"{sizes['float']['disk_mb']:.3f}" if "float" in sizes else "") + " | "
                     + " | ".join(f"{sizes[k.removesuffix('_rec')]['disk_mb']:.3f}"
                                  if k.removesuffix("_rec") in sizes else "" for k, _ in keys) + " |")
    for label, arm in at.items():
        cells = []
        for key in ["test"] + [k for k, _ in keys]:
            values = [_value(r, key) for r in rows_of(runs, scenario, arm)]
            cells.append(f"{statistics.mean(values):.3f}"
                         + ("" if arm == "adamw" else f"<br>{_ci(_diff(runs, scenario, arm, 'adamw', key))}"))
        name = f"sam* (`{arm}`)" if label == "sam*" else arm
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def format_summary(result: dict, scenarios: list[str], title: str, loss: bool = False) -> list[str]:
    """Per format: the paired differences of each arm to AdamW, and of the defaults and the cheap setting to SAM*,
    pooled over the scenarios' seeds (n = scenarios x seeds) for the mean and its 95% t-interval; with `loss`, of
    the accuracy the format costs (test accuracy minus accuracy in the format; negative: the arm loses less)."""
    runs = result["runs"]
    scenarios = [sc for sc in scenarios if rows_of(runs, sc, "adamw")]
    keys = [(k, t) for k, t in format_keys(result) if all(_present(runs, sc, k) for sc in scenarios)]
    if not keys or not scenarios:
        return []
    per = {sc: _deploy_arms(runs, sc) for sc in scenarios}
    labels = [label for label in DEPLOY_ARMS if all(label in per[sc] for sc in scenarios) and label != "adamw"]
    against_sam = [label for label in ("gam", "r3", "cheap_gam", "gam@1x", "r3@1x") if label in labels and "sam*" in labels]
    what = "accuracy lost to each format (test accuracy minus accuracy in the format)" if loss else "test accuracy"
    lines = ["", f"### {title}, deployable formats{', loss' if loss else ''}: {', '.join(scenarios)}", "",
             f"Paired differences of the {what}, pooled over the scenarios' seeds: mean and 95% t-interval.", "",
             "| format | AdamW | " + " | ".join([f"{label} − AdamW" for label in labels]
                                                + [f"{label} − SAM*" for label in against_sam]) + " |",
             "|---|---|" + "---|" * (len(labels) + len(against_sam))]
    def value(row, key):
        return row["test"] - _value(row, key) if loss else _value(row, key)

    for key, title_ in ([] if loss else [("test", "none (test acc.)")]) + keys:
        adamw = statistics.mean(value(r, key) for sc in scenarios for r in rows_of(runs, sc, "adamw"))
        cells = []
        for reference, group in (("adamw", labels), ("sam*", against_sam)):
            for label in group:
                pooled = [d for sc in scenarios for d in paired(rows_of(runs, sc, per[sc][label]),
                                                                rows_of(runs, sc, per[sc][reference]),
                                                                lambda r, a, k=key: value(r, k) - value(a, k))]
                cells.append(_ci(pooled))
        lines.append(f"| {title_} | {adamw:.3f} | " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------------------
# Figures

PLOT_METHODS = {"adamw": ("AdamW", "C7"), "sam*": ("SAM*", "C1"), "gam": ("GAM (defaults)", "C0"),
                "r3": ("CHEAP_GAM (r3)", "C2"), "cheap_gam": ("CHEAP_GAM", "C2")}


def _groups(result: dict) -> list[tuple[str, list[str]]]:
    scenarios = [n for n in result["settings"]["scenarios"] if any(r["scenario"] == n for r in result["runs"])]
    groups = [("development", [n for n in scenarios if n not in HELD_OUT + DEPLOYMENT]),
              ("held out", [n for n in scenarios if n in HELD_OUT]),
              ("deployment", [n for n in scenarios if n in DEPLOYMENT])]
    return [(title, names) for title, names in groups if names]


def compute_curves(result: dict, scenarios: list[str]) -> dict[str, list[tuple[float, float, float]]]:
    """{method: [(passes spent, test accuracy, 90%-pruned accuracy), ...] by budget}: means over `scenarios` (a
    method at a budget only where it ran in every one of them)."""
    runs, arms = result["runs"], list(result["arms"])
    curves = {}
    for budget in BUDGETS:
        per = {sc: arms_at(runs, sc, arms, budget) for sc in scenarios}
        for m in per[scenarios[0]]:
            if not all(m in per[sc] for sc in scenarios):
                continue
            values = [(passes_spent(runs, sc, per[sc][m]),
                       statistics.mean(r["test"] for r in rows_of(runs, sc, per[sc][m])),
                       statistics.mean(_value(r, "pruned_90") for r in rows_of(runs, sc, per[sc][m])))
                      for sc in scenarios]
            curves.setdefault(m, []).append(tuple(statistics.mean(v[i] for v in values) for i in range(3)))
    return curves


def plot_compute(result: dict, path: str) -> None:
    """Test accuracy and accuracy after 90% pruning against passes spent, one line per method, per scenario group
    (means over its scenarios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(result)
    curves_of = [compute_curves(result, scenarios) for _, scenarios in groups]
    # The named methods keep their colours; any other gets one none of them uses (the same in every panel), and a
    # dashed line.
    reserved = {color for _, color in PLOT_METHODS.values()}
    free = iter(c for c in (f"C{i}" for i in range(10)) if c not in reserved)
    others = dict.fromkeys(m for curves in curves_of for m in curves if m not in PLOT_METHODS)
    other = {m: next(free, None) for m in others}
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, ((title, scenarios), curves) in enumerate(zip(groups, curves_of)):
        for m, points in curves.items():
            label, color = PLOT_METHODS.get(m, (m, other.get(m)))
            for row in (0, 1):
                axes[row][col].plot([p[0] for p in points], [p[1 + row] for p in points],
                                    "o-" if m in PLOT_METHODS else "s--", label=label, color=color, ms=4)
        axes[0][col].set_title(f"{title}: {', '.join(scenarios)}", fontsize=8)
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(list(BUDGETS), [f"{b}x" for b in BUDGETS])
        axes[1][col].set_xlabel("forward/backward passes spent / AdamW's in 40 epochs")
    axes[0][0].set_ylabel("test accuracy (mean over scenarios)")
    axes[1][0].set_ylabel("accuracy after 90% pruning")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_formats(result: dict, path: str) -> None:
    """Test accuracy against weights on disk, per scenario with sizes and per optimizer: a line through the float
    model and the smaller MLPs (`mlp:F`; dashed: after the recovery fine-tune), a marker for each integer format
    (int8 o, int4 ^, mlp:0.5+int8 s; hollow: after recovery)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    scenarios = [sc for sc in result["settings"]["scenarios"] if result.get("sizes", {}).get(sc)]
    columns = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    markers = {"int8": "o", "int4": "^"}
    for index, scenario in enumerate(scenarios):
        sizes, ax = result["sizes"][scenario], axes[index // columns][index % columns]
        keys = [k for k, _ in format_keys(result) if _present(runs, scenario, k)]

        def mean(arm, key):
            return statistics.mean(_value(r, key) for r in rows_of(runs, scenario, arm))

        for i, (label, arm) in enumerate(_deploy_arms(runs, scenario).items()):
            if label not in ("adamw", "adamw_2x", "sam*", "gam", "r3", "cheap_gam"):
                continue
            name, color = PLOT_METHODS.get(label, (label, f"C{i + 3}"))
            for dashed in (False, True):
                family = [k for k in keys if k.startswith("mlp_") and "+" not in k and k.endswith("_rec") == dashed]
                points = sorted([(sizes["float"]["disk_mb"], mean(arm, "test"))] +
                                [(sizes[k.removesuffix("_rec")]["disk_mb"], mean(arm, k)) for k in family
                                 if k.removesuffix("_rec") in sizes])
                ax.plot([p[0] for p in points], [p[1] for p in points], "--" if dashed else "-", color=color,
                        marker=".", label=None if dashed else name)
            for key in keys:
                base = key.removesuffix("_rec")
                if (key.startswith("mlp_") and "+" not in key) or base not in sizes:
                    continue
                marker = markers.get(base, "s")
                ax.plot([sizes[base]["disk_mb"]], [mean(arm, key)], marker, color=color, ms=5,
                        fillstyle="none" if key.endswith("_rec") else "full")
        ax.set_xscale("log")
        ax.set_title(scenario, fontsize=9)
        ax.set_xlabel("weights on disk (MB)")
    for index in range(len(scenarios), rows * columns):
        axes[index // columns][index % columns].axis("off")
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("lines: float and mlp:F (dashed: after recovery); markers: int8 o, int4 ^, mlp:0.5+int8 s "
                 "(hollow: after recovery)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

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
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="with --tables: draw accuracy and 90%%-pruned accuracy against passes spent")
    parser.add_argument("--plot_formats", default=None, metavar="PNG",
                        help="with --tables of --measure output: draw accuracy against size on disk per optimizer")
    parser.add_argument("--save_models", default=None, metavar="DIR",
                        help="keep every fine-tuned model under DIR/<scenario>/seed<k>/<arm> (for --measure)")
    parser.add_argument("--measure", default=None, metavar="DIR",
                        help="measure the deployable formats of the models saved under DIR; train nothing else")
    parser.add_argument("--formats", default=None,
                        help=f"comma-separated deployable formats for --measure (default {','.join(FORMATS)}); "
                        "while training, measured too when given")
    parser.add_argument("--recover_epochs", type=float, default=None,
                        help="epochs of the recovery fine-tune after mlp:F (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tables:
        result = merge(args.tables)
        print(markdown(result))
        if args.plot:
            plot_compute(result, args.plot)
        if args.plot_formats:
            plot_formats(result, args.plot_formats)
        return result
    torch.set_num_threads(args.threads)
    s = copy.deepcopy(SETTINGS["quick" if args.quick else "full"])
    if args.recover_epochs is not None:
        s["recover_epochs"] = args.recover_epochs
    if args.scenarios:
        s["scenarios"] = args.scenarios.split(",")
        unknown = set(s["scenarios"]) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    formats = tuple(args.formats.split(",")) if args.formats else ()
    if formats:
        from hf_gam.compression import Compression

        for spec in formats:
            try:
                Compression.parse(spec)
            except ValueError as error:
                parser.error(str(error))
    start = time.perf_counter()
    if args.measure:
        if not os.path.isdir(args.measure):
            parser.error(f"--measure: no directory {args.measure}")
        result = measure(s, args.measure, formats or FORMATS, args.scenarios and s["scenarios"],
                         args.seeds and s["seeds"], args.arms and args.arms.split(","),
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
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
        twins = duplicate_arms(arms)
        if twins:
            parser.error("arms with the same values would run twice: "
                         + ", ".join(f"{a} = {b}" for a, b in twins))
        result = run(s, arms, log=lambda m: print(m, file=sys.stderr, flush=True), formats=formats,
                     save_dir=args.save_models)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s, {args.threads} thread(s).")
    return result


if __name__ == "__main__":
    main()
