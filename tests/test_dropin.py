"""GAM beyond the plain Trainer: Seq2SeqTrainer, TRL's SFTTrainer, a user's compute_loss, PEFT LoRA, torch.compile and
gradient checkpointing. Each exactness test compares one SGD step (learning rate 1, no clipping) with the float64
oracle of oracle.py, computed on the loss the trainer itself optimises."""

import copy
import dataclasses

import pytest
import torch
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainingArguments

from hf_gam import GAMConfig, GAMMixin, GAMTrainer, gam_config_class

from oracle import flat_gradient_fn, flat_gradient_of, oracle_direction
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

# Radii larger than the released ones, so that every term of d matters at this scale.
HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)
ORACLE = dict(grad_rho=0.05, grad_norm_rho=0.3, alpha=0.6, beta=0.4, gamma=0.5)


def sgd_config(cls, output_dir, **overrides):
    """`cls` (a TrainingArguments subclass) with the values of tiny.sgd_args: one step moves theta by exactly -d."""
    base = sgd_args(output_dir)
    aliases = ("gradient_checkpointing", "gradient_checkpointing_kwargs")  # deprecated names of activation_checkpointing*
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init and f.name not in aliases}
    if not issubclass(cls, GAMConfig):
        values = {k: v for k, v in values.items() if not k.startswith("gam_")}
    values.update(overrides)
    return cls(**values)


def moved_by_training(trainer):
    before = flat_params(trainer.model)
    trainer.train()
    return before - flat_params(trainer.model)


# ---- Seq2SeqTrainer ----


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=24, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).double()


def seq2seq_data(n=8):
    g = torch.Generator().manual_seed(0)
    source = torch.randint(2, 24, (n, 6), generator=g)
    target = torch.randint(2, 24, (n, 4), generator=g)
    target[:2, -1] = -100  # some ignored label positions
    return [{"input_ids": source[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": target[i]}
            for i in range(n)]


def test_seq2seq_trainer_step_equals_oracle(tmp_path):
    class S2S(GAMMixin, Seq2SeqTrainer):
        pass

    model, data = tiny_t5(), seq2seq_data()
    args = sgd_config(gam_config_class(Seq2SeqTrainingArguments), tmp_path, predict_with_generate=True, **HPARAMS)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    gradient, theta = flat_gradient_fn(model, batch)
    expected = oracle_direction(gradient, theta, **ORACLE)
    assert relative_error(gradient(theta), expected) > 1e-3  # d is far from g0, so the check can fail

    trainer = S2S(model=model, args=args, train_dataset=data)
    assert trainer.args.predict_with_generate and trainer.args.gam_grad_rho == 0.05
    assert relative_error(moved_by_training(trainer), expected) < 1e-10


# ---- TRL's SFTTrainer ----


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).double()


WORDS = "the a cat dog sat ran on mat rug fast slow big small red blue".split()


def word_tokenizer():
    """A word-level tokenizer built offline (no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_data(n=8):
    """Sentences of 3 to 8 words: the collator pads them, so the loss has ignored positions."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths]
    return Dataset.from_dict({"text": texts})


class SFT(GAMMixin, trl.SFTTrainer):
    pass


def sft_args(tmp_path, **overrides):
    """SFTConfig's own defaults (activation checkpointing on) except bf16, which makes a float64 check impossible."""
    values = dict(per_device_train_batch_size=4, bf16=False, activation_checkpointing=True, **HPARAMS)
    values.update(overrides)
    return sgd_config(gam_config_class(trl.SFTConfig), tmp_path, **values)


def sft_oracle(model, args, data, tokenizer, **oracle_kwargs):
    """(gradient function, theta) of the stock SFTTrainer's own `compute_loss` on its first collated batch."""
    stock = trl.SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(stock.get_train_dataloader()))
    num_items = stock._get_num_items_in_batch([batch], stock.args.device)
    return flat_gradient_of(stock.model, lambda work: stock.compute_loss(work, dict(batch), num_items_in_batch=num_items))


def test_sft_trainer_step_equals_oracle_on_its_own_loss(tmp_path):
    model, data, tokenizer = tiny_llama(), text_data(), word_tokenizer()
    args = sft_args(tmp_path)
    gradient, theta = sft_oracle(model, args, data, tokenizer)
    expected = oracle_direction(gradient, theta, **ORACLE)
    assert relative_error(gradient(theta), expected) > 1e-3

    trainer = SFT(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert relative_error(moved_by_training(trainer), expected) < 1e-10
    assert trainer.model.is_activation_checkpointing


def test_sft_metrics_count_each_batch_once_at_theta(tmp_path):
    """SFTTrainer records the token count, entropy and token accuracy inside compute_loss: the perturbed passes must
    not add to them, so GAM logs what the stock SFTTrainer logs on the same batch at the same parameters."""
    model, data, tokenizer = tiny_llama(), text_data(), word_tokenizer()
    logged = {}
    for name, cls, method in (("stock", trl.SFTTrainer, "none"), ("gam", SFT, "gam")):
        args = sft_args(tmp_path, gam_method=method, logging_strategy="steps", logging_steps=1)
        trainer = cls(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        logged[name] = trainer.state.log_history[0]
    assert logged["gam"]["num_tokens"] == logged["stock"]["num_tokens"] > 0
    for key in ("entropy", "mean_token_accuracy", "loss"):
        assert logged["gam"][key] == pytest.approx(logged["stock"][key], rel=1e-12, abs=1e-15), key
    assert "gam/grad_norm" in logged["gam"]


def test_sft_config_default_bf16_is_sft_trainers_own_rounding(tmp_path):
    """SFTConfig defaults to bf16=True (autocast, also on CPU): the stock SFTTrainer's plain step then differs from
    the float64 gradient of its own loss, and gam_method="none" reproduces the stock step bit for bit."""
    model, data, tokenizer = tiny_llama(), text_data(), word_tokenizer()
    args = sft_args(tmp_path, bf16=None, gam_method="none")
    assert args.bf16
    gradient, theta = sft_oracle(model, args, data, tokenizer)
    stock = trl.SFTTrainer(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
    stock_moved = moved_by_training(stock)
    assert relative_error(stock_moved, gradient(theta)) > 1e-4  # bf16 rounding, in the stock trainer
    mixin = SFT(model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer)
    assert torch.equal(moved_by_training(mixin), stock_moved)


# ---- combining argument classes ----


@pytest.mark.parametrize("base", ["seq2seq", "sft"])
def test_gam_config_class_combines_fields(tmp_path, base):
    assert gam_config_class(TrainingArguments) is GAMConfig and gam_config_class(GAMConfig) is GAMConfig
    base = Seq2SeqTrainingArguments if base == "seq2seq" else trl.SFTConfig
    combined = gam_config_class(base)
    assert combined is gam_config_class(base) and issubclass(combined, base) and issubclass(combined, GAMConfig)
    args = combined(output_dir=str(tmp_path), use_cpu=True, gam_grad_rho=0.07, gam_method="sam")
    assert (args.gam_grad_rho, args.gam_method) == (0.07, "sam")
    assert args.learning_rate == base(output_dir=str(tmp_path), use_cpu=True).learning_rate  # base's defaults kept
    assert args.to_dict()["gam_grad_rho"] == 0.07
    (parsed,) = HfArgumentParser(combined).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--gam_grad_norm_rho", "0.4"])
    assert parsed.gam_grad_norm_rho == 0.4
    with pytest.raises(ValueError, match="gam_alpha"):
        combined(output_dir=str(tmp_path), use_cpu=True, gam_alpha=2.0)
    restored = torch.load(_saved(args, tmp_path), weights_only=False)  # the Trainer saves training_args.bin
    assert type(restored) is combined and restored.gam_grad_rho == 0.07


def _saved(obj, tmp_path):
    path = tmp_path / "args.bin"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("base", ["seq2seq", "sft"])
def test_undecorated_subclass_fails_loudly(tmp_path, base):
    base = Seq2SeqTrainingArguments if base == "seq2seq" else trl.SFTConfig

    class Args(base, GAMConfig):  # no @dataclass: the gam_* fields are not declared
        pass

    with pytest.raises(TypeError, match="gam_config_class"):
        Args(output_dir=str(tmp_path), use_cpu=True)
    with pytest.raises(TypeError, match="gam_config_class"):
        HfArgumentParser(Args).parse_dict({"output_dir": str(tmp_path), "use_cpu": True, "gam_grad_rho": 0.1},
                                          allow_extra_keys=True)


def test_mixin_keeps_the_fields_of_a_plain_subclass_config(tmp_path):
    """A plain Seq2SeqTrainingArguments passed to the mixin keeps its own fields and gets GAM's defaults."""
    class S2S(GAMMixin, Seq2SeqTrainer):
        pass

    args = sgd_config(Seq2SeqTrainingArguments, tmp_path, predict_with_generate=True, generation_max_length=7)
    trainer = S2S(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    assert isinstance(trainer.args, Seq2SeqTrainingArguments) and isinstance(trainer.args, GAMConfig)
    assert trainer.args.generation_max_length == 7 and trainer.args.gam_method == "gam"


# ---- a user's compute_loss ----


def test_overridden_compute_loss_drives_every_pass(tmp_path):
    weights = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)

    def weighted(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs["logits"], batch["labels"], weight=weights)

    class Weighted(GAMTrainer):
        calls = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            Weighted.calls += 1
            outputs = model(x=inputs["x"])
            loss = weighted(outputs, inputs)
            return (loss, outputs) if return_outputs else loss

    torch.manual_seed(0)
    model, data = TinyClassifier(), make_data()
    batch = batch_of(data, 0, 8)
    gradient, theta = flat_gradient_fn(model, batch, loss_fn=weighted)
    expected = oracle_direction(gradient, theta, **ORACLE)
    plain_gradient, _ = flat_gradient_fn(model, batch)
    assert relative_error(oracle_direction(plain_gradient, theta, **ORACLE), expected) > 1e-2

    trainer = Weighted(model=model, args=sgd_args(tmp_path, **HPARAMS), train_dataset=data)
    assert relative_error(moved_by_training(trainer), expected) < 1e-10
    assert Weighted.calls == 4


# ---- PEFT LoRA, gradient checkpointing ----


def tiny_vit(dropout=0.0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)
    return ViTForImageClassification(config).double()


def image_data(n=16):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"pixel_values": pixels[i], "labels": int(labels[i])} for i in range(n)]


def test_peft_lora_step_equals_oracle_over_adapters(tmp_path):
    # init_lora_weights=False draws B at random too, so every adapter gets a gradient at theta.
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["classifier"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_vit(), config)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(t.numel() for t in frozen.values())
    data = image_data()
    batch = {"pixel_values": torch.stack([r["pixel_values"] for r in data[:8]]),
             "labels": torch.tensor([r["labels"] for r in data[:8]])}
    gradient, theta = flat_gradient_fn(model, batch)
    expected = oracle_direction(gradient, theta, **ORACLE)
    assert relative_error(gradient(theta), expected) > 1e-3

    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, **HPARAMS), train_dataset=data)
    assert relative_error(moved_by_training(trainer), expected) < 1e-10
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert trainer._gam_step.buffer_numel() == 3 * trainable  # theta, h-, alpha g1: trainable parameters only


def test_gradient_checkpointing_equals_no_checkpointing(tmp_path):
    """Dropout on: the recomputed forward of a checkpointed block must draw the masks GAM's passes drew."""
    data = image_data()
    runs = {}
    for checkpointing in (False, True):
        model = tiny_vit(dropout=0.1)
        args = sgd_args(tmp_path, max_steps=2, learning_rate=0.5, activation_checkpointing=checkpointing, **HPARAMS)
        trainer = GAMTrainer(model=model, args=args, train_dataset=data)
        runs[checkpointing] = moved_by_training(trainer)
        assert model.is_activation_checkpointing == checkpointing
    assert runs[True].norm() > 0
    assert relative_error(runs[True], runs[False]) < 1e-12


# ---- torch.compile ----


def test_torch_compile_trains_like_eager_without_recompiling(tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = TinyClassifier(dtype=torch.float32)
    data = make_data(n=32, dtype=torch.float32)
    common = dict(max_steps=4, learning_rate=0.1, **HPARAMS)
    eager = copy.deepcopy(model)
    GAMTrainer(model=eager, args=sgd_args(tmp_path, **common), train_dataset=data).train()

    torch._dynamo.reset()
    counters.clear()
    compiled = copy.deepcopy(model)
    args = sgd_args(tmp_path, torch_compile=True, torch_compile_backend="aot_eager", **common)
    trainer = GAMTrainer(model=compiled, args=args, train_dataset=data)
    trainer.train()
    # 4 steps x 4 passes ran through the compiled module: compiled once, no recompilation per pass or per step.
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert 1 <= counters["frames"]["ok"] <= 2, dict(counters["frames"])
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    # aot_eager runs the same aten kernels as eager, but decompositions may reorder float32 sums: 4 steps of
    # rounding, far below the size of a step (lr 0.1 x |d|), which is what a wrong pass would change.
    moved = flat_params(eager) - flat_params(model)
    assert moved.norm() > 1e-3
    assert relative_error(flat_params(compiled) - flat_params(model), moved) < 1e-5
