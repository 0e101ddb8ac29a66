"""Settings by regime: the defaults are for fine-tuning, `PRETRAIN_GAM` for training from scratch, and GAMTrainer
says so once when it sees a model built from a config while the fine-tuning defaults are in force."""

import logging

import pytest
import torch

import hf_gam
from hf_gam import GAMConfig, GAMTrainer
from hf_gam.config import uses_finetuning_schedule
from hf_gam.trainer import loaded_from_pretrained
from tiny import TinyClassifier


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               num_labels=3))


def _warnings(caplog, model, tmp_path, **overrides):
    args = GAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        GAMTrainer(model=model, args=args)
    return [r.getMessage() for r in caplog.records if "PRETRAIN_GAM" in r.getMessage()]


def test_defaults_are_full_gam_from_the_first_step_and_presets_name_the_regimes(tmp_path):
    args = GAMConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (args.gam_method, args.gam_start, args.gam_rho_schedule, args.gam_interval) == ("gam", 0.0, "constant", 1)
    assert (args.gam_grad_rho, args.gam_grad_norm_rho) == (0.02, 0.2)
    assert uses_finetuning_schedule(args)
    assert all(getattr(args, key) == value for key, value in hf_gam.RELEASED_GAM.items())
    assert hf_gam.PRETRAIN_GAM == {"gam_start": 0.75, "gam_rho_schedule": "linear"}
    assert all(getattr(args, key) == value for key, value in hf_gam.FINETUNE_GAM.items())
    assert set(hf_gam.FINETUNE_GAM) == set(hf_gam.PRETRAIN_GAM)  # the same fields choose the regime
    assert not uses_finetuning_schedule(GAMConfig(output_dir=str(tmp_path), use_cpu=True, **hf_gam.PRETRAIN_GAM))


def test_warning_for_a_model_built_from_a_config_not_for_a_pretrained_one(tmp_path, caplog):
    vit = _vit()
    messages = _warnings(caplog, vit, tmp_path)
    assert len(messages) == 1 and "from_pretrained" in messages[0]
    vit.save_pretrained(tmp_path / "vit")
    pretrained = type(vit).from_pretrained(tmp_path / "vit")
    assert loaded_from_pretrained(vit) is False and loaded_from_pretrained(pretrained) is True
    assert _warnings(caplog, pretrained, tmp_path) == []
    # Not when the user chose a setting for the regime, nor for the stock step, nor for SGD (the released setting).
    assert _warnings(caplog, vit, tmp_path, **hf_gam.PRETRAIN_GAM) == []
    assert _warnings(caplog, vit, tmp_path, gam_method="none") == []
    assert _warnings(caplog, vit, tmp_path, optim="sgd") == []
    # A plain nn.Module says nothing of where its weights come from: no guess.
    assert loaded_from_pretrained(TinyClassifier()) is None
    assert _warnings(caplog, TinyClassifier(), tmp_path) == []


def test_model_init_and_peft_are_judged_by_the_model_inside(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    vit = _vit()
    vit.save_pretrained(tmp_path / "vit")
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    pretrained = peft.get_peft_model(type(vit).from_pretrained(tmp_path / "vit"), lora)
    assert _warnings(caplog, pretrained, tmp_path) == []
    assert len(_warnings(caplog, peft.get_peft_model(_vit(), lora), tmp_path)) == 1
    args = GAMConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, save_strategy="no",
                     per_device_train_batch_size=4, remove_unused_columns=False)
    data = [{"pixel_values": torch.randn(1, 8, 8), "labels": i % 3} for i in range(8)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        GAMTrainer(model_init=_vit, args=args, train_dataset=data).train()
    assert len([r for r in caplog.records if "PRETRAIN_GAM" in r.getMessage()]) == 1
