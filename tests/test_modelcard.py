"""The GAM section of the model card: content, no tokens, idempotence, and the real stock card."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_gam.config import GAMConfig  # noqa: E402
from hf_gam.modelcard import (  # noqa: E402
    GAM_CITATION,
    GAM_TAGS,
    SECTION_BEGIN,
    append_gam_section,
    read_gam_section,
    render_gam_section,
)

SECRET = "hf_secretTOKENvalue0123456789"


def make_args(tmp_path, **overrides) -> GAMConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=[],
        learning_rate=3e-5,
        per_device_train_batch_size=7,
        gradient_accumulation_steps=3,
        num_train_epochs=2.5,
        gam_method="gam",
        gam_grad_rho=0.015,
        gam_grad_norm_rho=0.125,
        gam_alpha=0.7,
        gam_beta=0.25,
        gam_gamma=0.05,
        gam_formula="paper",
        gam_adaptive=True,
        gam_sync="global",
        gam_rho_schedule="lr",
        gam_interval=2,
        gam_same_rng=False,
        hub_token=SECRET,
    )
    values.update(overrides)
    return GAMConfig(**values)


def test_section_records_every_gam_field_and_base_optimizer(tmp_path):
    args = make_args(tmp_path)
    rows = read_gam_section(render_gam_section(args))
    gam_names = [name for name in vars(args) if name.startswith("gam_")]
    assert len(gam_names) >= 13
    for name in gam_names:
        value = getattr(args, name)
        expected = repr(value) if isinstance(value, float) else str(value)
        assert rows[name] == expected, name
    assert rows["gam_formula"] == "paper" and rows["gam_grad_rho"] == "0.015"
    assert rows["optim"] == args.optim.value and not rows["optim"].startswith("OptimizerNames")
    assert rows["learning_rate"] == "3e-05"
    assert rows["per_device_train_batch_size"] == "7"
    assert rows["total_train_batch_size"] == str(7 * 3 * args.world_size)
    assert rows["num_train_epochs"] == "2.5"


def test_section_has_citation_and_never_a_token(tmp_path):
    args = make_args(tmp_path)
    text = render_gam_section(args)
    assert GAM_CITATION in text and "2303.03108" in text and "Zhang, Xingxuan" in text
    assert SECRET not in text and "token" not in text.lower()
    assert {"gam", "sharpness-aware"} <= set(GAM_TAGS)


def test_append_is_idempotent_and_keeps_the_stock_card(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\ntags:\n- generated_from_trainer\n---\n\n# my-model\n\nstock text\n", encoding="utf-8")
    args = make_args(tmp_path)
    append_gam_section(str(readme), args)
    append_gam_section(str(readme), make_args(tmp_path, gam_gamma=0.5))
    text = readme.read_text(encoding="utf-8")
    assert text.count(SECTION_BEGIN) == 1
    assert text.startswith("---\ntags:") and "stock text" in text
    assert read_gam_section(text)["gam_gamma"] == "0.5"


def test_missing_section_is_an_error():
    with pytest.raises(ValueError, match="no GAM section"):
        read_gam_section("# a card without GAM\n")


def test_section_on_the_stock_trainer_card(tmp_path):
    """The stock `Trainer.create_model_card` output plus the section still loads as a valid card."""
    from huggingface_hub import ModelCard
    from transformers import Trainer, ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       image_size=8, patch_size=4, num_labels=2)
    args = make_args(tmp_path, gam_method="sam")
    trainer = Trainer(model=ViTForImageClassification(config), args=args)
    trainer.create_model_card(model_name="tiny", tags=GAM_TAGS + ["image-classification"], dataset="folder")
    readme = os.path.join(args.output_dir, "README.md")
    append_gam_section(readme, args)
    card = ModelCard.load(readme)
    assert {"gam", "sharpness-aware", "image-classification"} <= set(card.data.tags)
    assert read_gam_section(card.text)["gam_method"] == "sam"
    assert SECRET not in open(readme, encoding="utf-8").read()


def test_gam_trainer_card_takes_the_stock_arguments_in_the_stock_order(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import ViTConfig, ViTForImageClassification

    from hf_gam import GAMTrainer

    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                       image_size=8, patch_size=4, num_labels=2)
    args = make_args(tmp_path)
    trainer = GAMTrainer(model=ViTForImageClassification(config), args=args)
    trainer.create_model_card("en", "mit", ["image-classification"], "tiny")  # language, license, tags, model_name
    card = ModelCard.load(os.path.join(args.output_dir, "README.md"))
    assert (card.data.language, card.data.license) == (["en"], "mit")
    assert {"gam", "sharpness-aware", "image-classification"} <= set(card.data.tags)
    assert "# tiny" in card.text and read_gam_section(card.text)["gam_method"] == "gam"


def test_section_describes_the_step_that_ran(tmp_path):
    """SAM along the momentum runs one pass, not SAM's two: the card says which."""
    def section(**values):
        return render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True, **values))

    assert "SAM (two forward/backward passes per micro-batch" in section(gam_method="sam")
    momentum = section(gam_method="sam", gam_perturbation="momentum")
    assert "Method: SAM along the optimizer's momentum" in momentum and "one forward/backward pass" in momentum
    assert "two forward/backward" not in momentum


@pytest.mark.parametrize("setting, name", [("CHEAP_GAM", "`hf_gam.CHEAP_GAM` (for fine-tuning at less compute)"),
                                           ("PRETRAIN_GAM", "`hf_gam.PRETRAIN_GAM` (for training from scratch)")])
def test_section_names_the_ready_setting_used(tmp_path, setting, name):
    import hf_gam

    values = getattr(hf_gam, setting)
    card = render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True, **values))
    assert f"GAM setting: {name};" in card
    assert all(read_gam_section(card)[key] == str(value) for key, value in values.items())
    defaults = render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True))
    assert ("GAM setting: the defaults of `GAMConfig` (the values of `hf_gam.FINETUNE_GAM` and `hf_gam.RELEASED_GAM` "
            "too);") in defaults
    # FINETUNE_GAM and RELEASED_GAM equal the defaults: an SGD run with the released values is not "for fine-tuning".
    released = render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True, optim="sgd", **hf_gam.RELEASED_GAM))
    assert "for fine-tuning" not in released and "the defaults of `GAMConfig`" in released
    # A setting with a value of its own is no ready setting (its values are in the table).
    changed = render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True, gam_sync="global", **values))
    assert "GAM setting" not in changed
    assert "GAM setting" not in render_gam_section(make_args(tmp_path))  # radii of its own
    assert "GAM setting" not in render_gam_section(GAMConfig(output_dir=str(tmp_path), use_cpu=True, gam_method="none"))


def test_compression_table_renders_reads_back_and_replaces_itself(tmp_path):
    from hf_gam.modelcard import append_compression_table, read_compression_table

    readme = str(tmp_path / "README.md")
    with open(readme, "w", encoding="utf-8") as f:
        f.write("# a card\n")
    first = {"baseline": 0.9, "pruned_90": 0.5, "weights_2bit": 0.75, "noise_0.1": 0.875}
    append_compression_table(readme, first, "test", 300)
    text = open(readme, encoding="utf-8").read()
    assert "## Accuracy after compression" in text and "300 examples of the split `test`" in text
    assert "| `pruned_90` | 90% of weights pruned (global magnitude) | 0.5000 | -0.4000 |" in text
    assert read_compression_table(text) == first
    second = {"baseline": 0.8, "int8_dynamic": 0.79}
    append_compression_table(readme, second, "validation", 100)
    text = open(readme, encoding="utf-8").read()
    assert text.count("## Accuracy after compression") == 1 and text.startswith("# a card\n")
    assert read_compression_table(text) == second
    with pytest.raises(ValueError, match="no compression table"):
        read_compression_table("# a card\n")
