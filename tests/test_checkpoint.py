"""Checkpoints restore every weight: resume and `load_best_model_at_end` through real Trainer runs of a tiny ViT.

Transformers 5.x saves a ViT's encoder under its original key names (`vit.encoder.layer.0.attention.attention.query`)
while the module holds `vit.layers.0.attention.q_proj`; these tests catch any path that loads the raw names.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, ViTConfig, ViTForImageClassification

from hf_gam import GAMConfig, GAMMixin, GAMTrainer
from hf_gam.checkpoint import CheckpointMismatchError, load_checkpoint_weights


def tiny_vit(seed):
    """A 1-layer ViT on 8x8 grey images; `seed` sets its random initial weights."""
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def examples(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(1, 8, 8, generator=g), "labels": i % 3} for i in range(n)]


def run_args(output_dir, **overrides):
    """4 optimizer steps of 8 examples, deterministic batches, a checkpoint every 2 steps."""
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, max_steps=4, save_strategy="steps", save_steps=2,
        learning_rate=1e-2, use_cpu=True, report_to="none", logging_strategy="no", remove_unused_columns=False,
        train_sampling_strategy="sequential", disable_tqdm=True, seed=0, gam_grad_rho=0.01, gam_grad_norm_rho=0.05,
    )
    values.update(overrides)
    return GAMConfig(**values)


def train(trainer_class, model, output_dir, resume=None, **overrides):
    trainer = trainer_class(model=model, args=run_args(output_dir, **overrides), train_dataset=examples())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing(a, b):
    assert a.keys() == b.keys()
    return sorted(k for k in a if not torch.equal(a[k], b[k]))


@pytest.fixture(scope="module")
def gam_run(tmp_path_factory):
    """The uninterrupted 4-step GAMTrainer run: its final weights and its checkpoint-2."""
    out = tmp_path_factory.mktemp("gam_run")
    trainer = train(GAMTrainer, tiny_vit(seed=0), out)
    return weights(trainer.model), out / "checkpoint-2"


def copy_checkpoint(source, tmp_path):
    target = tmp_path / "checkpoint-2"
    shutil.copytree(source, target)
    return target


def test_checkpoint_holds_renamed_keys(gam_run):
    # The premise of this file: the saved names are not the module's names.
    _, checkpoint = gam_run
    saved = set(load_file(checkpoint / "model.safetensors"))
    assert "vit.encoder.layer.0.attention.attention.query.weight" in saved
    assert "vit.layers.0.attention.q_proj.weight" in tiny_vit(0).state_dict()


def test_resume_is_bit_identical_to_the_uninterrupted_run(gam_run, tmp_path):
    final, checkpoint = gam_run
    # A different initialisation: only what the checkpoint restores can make the runs agree.
    resumed = train(GAMTrainer, tiny_vit(seed=1), tmp_path / "resumed", resume=str(checkpoint))
    assert differing(weights(resumed.model), final) == []


def test_stock_trainer_resume_still_loses_the_renamed_weights(tmp_path):
    full = train(Trainer, tiny_vit(seed=0), tmp_path / "full")
    resumed = train(Trainer, tiny_vit(seed=1), tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    lost = differing(weights(resumed.model), weights(full.model))
    assert lost, (
        "transformers.Trainer now resumes this ViT exactly: upstream has fixed the checkpoint key conversion "
        "(transformers issues 43701 / 48805). GAMMixin._load_from_checkpoint / _load_best_model can be reviewed."
    )
    assert any(".layers.0." in k for k in lost)


def train_keeping_the_best_of_four(model, output_dir, train_dataset, eval_dataset):
    """A 4-step GAMTrainer run with `load_best_model_at_end`, evaluated and saved at every step; the evaluation scores
    1, 3, 2, 0 make checkpoint-2, not the last, the best."""
    scores = iter([1.0, 3.0, 2.0, 0.0])

    def compute_metrics(_):
        return {"score": next(scores)}

    args = run_args(
        output_dir, eval_strategy="steps", eval_steps=1, save_steps=1, per_device_eval_batch_size=8,
        load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True,
    )
    trainer = GAMTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         compute_metrics=compute_metrics)
    trainer.train()
    return trainer


def test_best_model_at_end_is_the_best_checkpoint(tmp_path):
    trainer = train_keeping_the_best_of_four(tiny_vit(0), tmp_path / "run", examples(), examples(8, seed=1))
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-2")
    best = weights(ViTForImageClassification.from_pretrained(tmp_path / "run" / "checkpoint-2"))
    last = weights(ViTForImageClassification.from_pretrained(tmp_path / "run" / "checkpoint-4"))
    assert differing(last, best)  # the choice matters for every weight checked below
    assert differing(weights(trainer.model), best) == []


def _write_sharded_safetensors(checkpoint):
    model = ViTForImageClassification.from_pretrained(checkpoint)
    os.remove(checkpoint / "model.safetensors")
    model.save_pretrained(checkpoint, max_shard_size="4KB")


def _write_bin(checkpoint):
    state_dict = load_file(checkpoint / "model.safetensors")
    os.remove(checkpoint / "model.safetensors")
    torch.save(state_dict, checkpoint / "pytorch_model.bin")


def _write_sharded_bin(checkpoint):
    state_dict = load_file(checkpoint / "model.safetensors")
    os.remove(checkpoint / "model.safetensors")
    keys = sorted(state_dict)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state_dict[k] for k in part}, checkpoint / name)
        weight_map.update({k: name for k in part})
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("write", [_write_sharded_safetensors, _write_bin, _write_sharded_bin],
                         ids=["sharded-safetensors", "pytorch_model.bin", "sharded-bin"])
def test_resume_from_other_weight_formats(gam_run, tmp_path, write):
    final, source = gam_run
    checkpoint = copy_checkpoint(source, tmp_path)
    write(checkpoint)
    assert not (checkpoint / "model.safetensors").exists()
    if write is _write_sharded_safetensors:
        index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    resumed = train(GAMTrainer, tiny_vit(seed=1), tmp_path / "resumed", resume=str(checkpoint))
    assert differing(weights(resumed.model), final) == []


def lora_vit(seed):
    from peft import LoraConfig, get_peft_model

    base = tiny_vit(0)  # the frozen "pretrained" weights, the same in every run
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))


def test_lora_vit_resumes_exactly(tmp_path):
    full = train(GAMTrainer, lora_vit(seed=1), tmp_path / "full", label_names=["labels"])
    assert (tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = train(GAMTrainer, lora_vit(seed=2), tmp_path / "resumed", label_names=["labels"],
                    resume=str(tmp_path / "full" / "checkpoint-2"))
    final = weights(full.model)
    assert differing(weights(lora_vit(seed=2)), final)  # the adapters start elsewhere
    assert differing(weights(resumed.model), final) == []


def test_unmatched_checkpoint_key_is_an_error(gam_run, tmp_path):
    _, source = gam_run
    checkpoint = copy_checkpoint(source, tmp_path)
    state_dict = load_file(checkpoint / "model.safetensors")
    state_dict["vit.encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)
    save_file(state_dict, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"attention\.extra\.weight"):
        train(GAMTrainer, tiny_vit(seed=1), tmp_path / "resumed", resume=str(checkpoint))


def test_missing_model_weight_is_an_error(gam_run, tmp_path):
    _, source = gam_run
    checkpoint = copy_checkpoint(source, tmp_path)
    state_dict = load_file(checkpoint / "model.safetensors")
    del state_dict["vit.encoder.layer.0.output.dense.weight"]
    save_file(state_dict, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"vit\.layers\.0\.mlp\.fc2\.weight"):
        load_checkpoint_weights(tiny_vit(seed=1), str(checkpoint))


def test_loading_keeps_the_model_tensors(gam_run):
    # Optimizers and GAM's buffers hold the parameter objects: loading must fill them, not replace them.
    _, checkpoint = gam_run
    model = tiny_vit(seed=1)
    before = dict(model.named_parameters())
    load_checkpoint_weights(model, str(checkpoint))
    after = dict(model.named_parameters())
    assert all(after[k] is before[k] for k in before)
    assert differing(weights(model), weights(ViTForImageClassification.from_pretrained(checkpoint))) == []


def test_tied_weight_left_out_of_the_checkpoint_is_tolerated(tmp_path):
    # `save_pretrained` drops `lm_head.weight` (tied to the embeddings), as `from_pretrained` expects.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    saved = GPT2LMHeadModel(config)
    saved.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config)
    load_checkpoint_weights(model, str(tmp_path))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert differing(weights(model), weights(saved)) == []


# ---- the model's own loading, the parent trainer's methods ----


class DataOrderViTForImageClassification(ViTForImageClassification):  # the name's ending picks the loss
    """A ViT that records the labels it trains on in a buffer whose length grows with the data seen; its own
    `load_state_dict` resizes the buffer to the checkpoint's before loading."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("data_order", torch.zeros(0, dtype=torch.long))

    def forward(self, pixel_values=None, labels=None, **kwargs):
        if self.training and labels is not None:
            self.data_order = torch.cat([self.data_order, labels])
        return super().forward(pixel_values=pixel_values, labels=labels, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.data_order = torch.zeros_like(state_dict["data_order"])
        return super().load_state_dict(state_dict, strict, assign)


def _seeded(cls, seed):
    config = tiny_vit(0).config
    torch.manual_seed(seed)
    return cls(config)


def test_renamed_checkpoint_goes_through_the_models_own_load_state_dict(tmp_path):
    full_gam = dict(gam_method="gam", gam_start=0.0, gam_rho_schedule="constant")
    full = train(GAMTrainer, _seeded(DataOrderViTForImageClassification, 0), tmp_path / "full", **full_gam)
    saved = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    assert saved["data_order"].shape == (64,)  # 2 steps x 8 labels x 4 passes; a fresh model holds none
    assert "vit.encoder.layer.0.attention.attention.query.weight" in saved  # and the encoder's names are converted
    resumed = train(GAMTrainer, _seeded(DataOrderViTForImageClassification, 1), tmp_path / "resumed",
                    resume=str(tmp_path / "full" / "checkpoint-2"), **full_gam)
    assert differing(weights(resumed.model), weights(full.model)) == []


class CalibratedViTForImageClassification(ViTForImageClassification):
    """A ViT with a persistent buffer that older checkpoints lack; a load hook declares it optional when
    `optional` is set."""

    def __init__(self, config, optional=True):
        super().__init__(config)
        self.register_buffer("calibration", torch.ones(3))
        if optional:
            self.register_load_state_dict_post_hook(_calibration_is_optional)


def _calibration_is_optional(module, incompatible_keys):
    if "calibration" in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove("calibration")


@pytest.mark.parametrize("optional", [True, False])
def test_a_weight_the_model_declares_optional_may_be_missing(gam_run, optional):
    _, checkpoint = gam_run
    model = CalibratedViTForImageClassification(tiny_vit(1).config, optional=optional)
    if not optional:
        with pytest.raises(CheckpointMismatchError, match="calibration"):
            load_checkpoint_weights(model, str(checkpoint))
        return
    load_checkpoint_weights(model, str(checkpoint))
    loaded = weights(model)
    assert torch.equal(loaded.pop("calibration"), torch.ones(3))
    assert differing(loaded, weights(ViTForImageClassification.from_pretrained(checkpoint))) == []


class RecordingTrainer(Trainer):
    """A trainer with its own checkpoint methods, as other Trainer subclasses have."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.loaded = getattr(self, "loaded", []) + [("resume", resume_from_checkpoint)]
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        self.loaded = getattr(self, "loaded", []) + [("best", self.state.best_model_checkpoint)]
        super()._load_best_model()


class RecordingGAMTrainer(GAMMixin, RecordingTrainer):
    pass


def test_the_parent_trainers_checkpoint_methods_run(gam_run, tmp_path):
    final, source = gam_run
    checkpoint = str(copy_checkpoint(source, tmp_path))
    args = run_args(tmp_path / "resumed", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
                    load_best_model_at_end=True)
    resumed = RecordingGAMTrainer(model=tiny_vit(seed=1), args=args, train_dataset=examples(),
                                  eval_dataset=examples(8, seed=1))
    resumed.train(resume_from_checkpoint=checkpoint)
    best = str(tmp_path / "resumed" / "checkpoint-4")
    assert resumed.loaded == [("resume", checkpoint), ("best", best)]
    assert differing(weights(resumed.model), final) == []


def tiny_mixtral(seed):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=16)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


@pytest.mark.parametrize("shards", [False, True])
def test_tensors_a_converter_combines_are_loaded_from_every_shard(tmp_path, shards):
    # Mixtral saves one tensor per expert; the module holds them stacked, so conversion combines several tensors.
    saved = tiny_mixtral(0)
    saved.save_pretrained(tmp_path, max_shard_size="1KB" if shards else "50GB")
    if shards:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        experts = {f for k, f in index["weight_map"].items() if ".experts." in k}
        assert len(experts) > 1
    model = tiny_mixtral(1)
    before = dict(model.named_parameters())
    load_checkpoint_weights(model, str(tmp_path))
    assert all(p is before[name] for name, p in model.named_parameters())
    assert differing(weights(model), weights(saved)) == []


# ---- a single-file checkpoint that leaves a tied weight out, through GAMTrainer ----


def tiny_gpt2(seed):
    """A 1-layer GPT-2 whose `lm_head.weight` is tied to the token embeddings (`save_pretrained` leaves it out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def token_examples(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 20, (n, 6), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def test_resume_of_a_single_file_checkpoint_without_its_tied_weight(tmp_path):
    """The checkpoint's one `model.safetensors` lacks `lm_head.weight`, so loading it with `strict=True` would fail:
    resume must load it as `from_pretrained` does (the tied weight follows the embeddings) and equal the
    uninterrupted run."""
    full = GAMTrainer(model=tiny_gpt2(0), args=run_args(tmp_path / "full"), train_dataset=token_examples())
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)).count("model.safetensors") == 1
    assert "lm_head.weight" not in load_file(checkpoint / "model.safetensors")
    resumed = GAMTrainer(model=tiny_gpt2(1), args=run_args(tmp_path / "resumed"), train_dataset=token_examples())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight
    assert differing(weights(resumed.model), weights(full.model)) == []


def test_best_model_of_a_single_file_checkpoint_without_its_tied_weight(tmp_path):
    trainer = train_keeping_the_best_of_four(tiny_gpt2(0), tmp_path / "run", token_examples(),
                                             token_examples(8, seed=1))
    best_dir = tmp_path / "run" / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best_dir)
    assert "lm_head.weight" not in load_file(best_dir / "model.safetensors")
    best = weights(type(trainer.model).from_pretrained(best_dir))
    last = weights(type(trainer.model).from_pretrained(tmp_path / "run" / "checkpoint-4"))
    assert differing(last, best)  # the choice matters
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    assert differing(weights(trainer.model), best) == []
