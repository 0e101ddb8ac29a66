"""The demo (`make demo`, `recipes/quickstart.py`) end to end on a tiny budget: pretrain, fine-tune with the stock
step and with GAM from `from_pretrained` for each seed, and print the mean and spread over the seeds side by side;
README's block has the demo's shape and states its defaults."""

import importlib.util
import logging
import re
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "recipes" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def readme_demo_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```text\n(Pretrained on .*?)```", text, re.S)
    assert block, "README shows the demo's output in a ```text block"
    return block.group(1).splitlines()


def test_demo_prints_mean_and_spread_over_seeds_side_by_side(tmp_path, capsys, caplog):
    quickstart = load_quickstart()
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        reports = quickstart.main(["--output_dir", str(tmp_path), "--pretrain_epochs", "2", "--num_train_epochs", "2",
                                   "--num_seeds", "2", "--n_train", "40", "--label_noise", "0.2", "--use_cpu"])
    out = capsys.readouterr().out
    assert list(reports) == ["stock step", "GAM"]
    for column in reports.values():
        assert len(column) == 2  # one report per seed
        for report in column:
            assert set(report) == set(quickstart.ROWS)
            assert all(0.0 <= value <= 1.0 for value in report.values())
    assert reports["stock step"] != reports["GAM"]  # different fine-tuning runs
    assert reports["GAM"][0] != reports["GAM"][1]  # different seeds
    lines = out.splitlines()
    header = next(line for line in lines if "stock step" in line and "GAM" in line and "-" in line)
    assert header.index("stock step") < header.index("GAM") < header.index("GAM - stock step")
    assert "fine-tuned on 40 images of 5-9, 20% of their labels flipped for 2 epochs; tested on 300 others" in out
    assert "over 2 seeds (0, 1:" in out
    for key, label in quickstart.ROWS.items():
        line = next(line for line in lines if line.startswith(label))
        stock = [report[key] for report in reports["stock step"]]
        gam = [report[key] for report in reports["GAM"]]
        differences = [a - b for a, b in zip(gam, stock)]
        expected = (
            f"{statistics.mean(stock):.3f} ± {statistics.stdev(stock):.3f}",
            f"{statistics.mean(gam):.3f} ± {statistics.stdev(gam):.3f}",
            f"{statistics.mean(differences):+.3f} [{min(differences):+.3f}, {max(differences):+.3f}]",
        )
        assert re.findall(r"\d\.\d{3} ± \d\.\d{3}|[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", line) == list(expected)
    # The fine-tuned models come from `from_pretrained`: no advice to use PRETRAIN_GAM.
    assert not [r for r in caplog.records if "PRETRAIN_GAM" in r.getMessage()]


def test_readme_shows_the_demo_with_its_defaults():
    quickstart = load_quickstart()
    block = readme_demo_block()
    defaults = quickstart.QuickstartArguments()
    assert block[0] == (
        f"Pretrained on 901 digits 0-4; fine-tuned on {defaults.n_train} images of 5-9 for "
        f"{quickstart.DEFAULTS['num_train_epochs']} epochs; tested on 300 others."
    )
    seeds = ", ".join(str(quickstart.DEFAULTS["seed"] + i) for i in range(defaults.num_seeds))
    assert block[1].startswith(f"Mean ± standard deviation over {defaults.num_seeds} seeds ({seeds}:")
    header = next(i for i, line in enumerate(block) if line.startswith(" ") and "GAM" in line)
    assert block[header].split() == ["stock", "step", "GAM", "GAM", "-", "stock", "step"]
    labels = [line.split("  ")[0] for line in block[header + 1:]]
    assert labels == [*quickstart.ROWS.values(), "training time per run (s)"]
