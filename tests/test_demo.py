"""The demo (`make demo`, `recipes/quickstart.py`) end to end on a tiny budget: pretrain, fine-tune with the stock
step and with GAM from `from_pretrained`, and print both side by side."""

import importlib.util
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "recipes" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_compares_the_stock_step_and_gam_side_by_side(tmp_path, capsys, caplog):
    quickstart = load_quickstart()
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        reports = quickstart.main(["--output_dir", str(tmp_path), "--pretrain_epochs", "1", "--num_train_epochs", "1",
                                   "--use_cpu"])
    out = capsys.readouterr().out
    assert list(reports) == ["stock step", "GAM"]
    for report in reports.values():
        assert set(report) == {"baseline", "pruned_90", "pruned_70", "weights_4bit", "weights_2bit", "int8_dynamic"}
        assert all(0.0 <= value <= 1.0 for value in report.values())
    assert reports["stock step"] != reports["GAM"]  # two different fine-tuning runs
    lines = out.splitlines()
    header = next(line for line in lines if "stock step" in line and "GAM" in line)
    assert header.index("stock step") < header.index("GAM")
    for label in quickstart.ROWS.values():
        assert any(line.startswith(label) for line in lines), label
    assert "tested on 300 others" in out
    # The fine-tuned models come from `from_pretrained`: no advice to use PRETRAIN_GAM.
    assert not [r for r in caplog.records if "PRETRAIN_GAM" in r.getMessage()]
