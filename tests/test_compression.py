"""Compression (`hf_gam.compression`): hand-computed small cases, copies that leave the model alone, the callback
under a real Trainer run, and the command line on a saved checkpoint."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hf_gam.compression import (
    Compression,
    CompressionCallback,
    accuracy,
    add_weight_noise,
    compression_report,
    format_table,
    prune_global_magnitude,
    quantize_dynamic_int8,
    quantize_weights_rtn,
)


class TwoLinear(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first = nn.Linear(first.shape[1], first.shape[0], bias=False)
        self.second = nn.Linear(second.shape[1], second.shape[0], bias=True)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)
            self.second.bias.fill_(0.25)

    def forward(self, x, labels=None):
        return {"logits": self.second(torch.relu(self.first(x)))}


def test_rtn_two_bits_by_hand():
    # Row 0: lo -0.9, hi 0.6 -> s = 1.5 / 3 = 0.5, z = round(1.8) = 2; w / s = [-1.8, -0.4, 0.8, 1.2] rounds to
    # [-2, 0, 1, 1], + z = [0, 2, 3, 3] (within [0, 3]) -> s (q - z) = [-1, 0, 0.5, 0.5].
    # Row 1: all positive, so lo = 0: s = 1.5 / 3 = 0.5, z = 0; w / s = [0.2, 0.6, 1.4, 3] -> [0, 1, 1, 3] * 0.5.
    # Row 2: lo -3, hi 0 -> s = 1, z = 3; w = [-3, -1.2, -0.4, 0] -> [-3, -1, 0, 0].
    first = torch.tensor([[-0.9, -0.2, 0.4, 0.6], [0.1, 0.3, 0.7, 1.5], [-3.0, -1.2, -0.4, 0.0]])
    model = TwoLinear(first, torch.ones(1, 3))
    quantize_weights_rtn(model, 2)
    expected = torch.tensor([[-1.0, 0.0, 0.5, 0.5], [0.0, 0.5, 0.5, 1.5], [-3.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(model.first.weight, expected, rtol=0, atol=1e-6)
    assert model.second.bias.eq(0.25).all()  # biases stay in floating point


def test_rtn_three_bits_and_a_convolution_per_output_channel():
    # Output channel 0 of a 1x2x2 kernel: [-0.6, 0.13, 0.47, 0.8]: s = 1.4 / 7 = 0.2, z = round(3) = 3;
    # w / s = [-3, 0.65, 2.35, 4] -> [-3, 1, 2, 4] -> [-0.6, 0.2, 0.4, 0.8].
    # Output channel 1 is 10x channel 0 and gets its own scale: the same levels times 10.
    conv = nn.Conv2d(1, 2, kernel_size=2, bias=False)
    channel = torch.tensor([-0.6, 0.13, 0.47, 0.8])
    with torch.no_grad():
        conv.weight.copy_(torch.stack([channel, 10 * channel]).view(2, 1, 2, 2))
    quantize_weights_rtn(nn.Sequential(conv), 3)
    levels = torch.tensor([-0.6, 0.2, 0.4, 0.8])
    torch.testing.assert_close(conv.weight.view(2, 4), torch.stack([levels, 10 * levels]), rtol=0, atol=1e-5)
    for bits in (8, 4, 3, 2):  # 2^bits levels at the most per channel
        layer = nn.Linear(64, 3)
        quantize_weights_rtn(nn.Sequential(layer), bits)
        assert all(len(torch.unique(row)) <= 2**bits for row in layer.weight)


def test_global_magnitude_pruning_by_hand():
    # Six weights over two layers; 50% = the 3 smallest magnitudes overall (0.5, 1, -2), whichever layer holds them.
    model = TwoLinear(torch.tensor([[1.0, -2.0], [3.0, -4.0]]), torch.tensor([[0.5, 5.0]]))
    prune_global_magnitude(model, 0.5)
    assert torch.equal(model.first.weight, torch.tensor([[0.0, 0.0], [3.0, -4.0]]))
    assert torch.equal(model.second.weight, torch.tensor([[0.0, 5.0]]))
    assert not hasattr(model.first, "weight_orig") and not model.first._forward_pre_hooks  # permanent, no mask
    assert isinstance(model.first.weight, nn.Parameter)
    big = nn.Sequential(nn.Linear(100, 30), nn.Conv2d(3, 10, 3))
    prune_global_magnitude(big, 0.9)
    weights = torch.cat([big[0].weight.flatten(), big[1].weight.flatten()])
    assert (weights == 0).sum().item() == round(0.9 * weights.numel())
    assert big[0].bias.ne(0).all()  # biases are not pruned


def test_global_pruning_takes_different_shares_of_different_layers():
    # Layer `first` holds only large weights (10..17), layer `second` only small ones (0.1..0.4): pruning half of all
    # twelve weights removes the 4 small ones and the 2 smallest large ones (10, 11), i.e. 100% of `second` and 25% of
    # `first`. Pruning each layer by half on its own would leave 2 weights of `second` and remove 4 of `first`.
    first = torch.tensor([[10.0, -11.0], [12.0, -13.0], [14.0, -15.0], [16.0, -17.0]])
    second = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    model = TwoLinear(first, second)
    prune_global_magnitude(model, 0.5)
    assert torch.equal(model.second.weight, torch.zeros(1, 4))
    assert torch.equal(model.first.weight, torch.tensor([[0.0, 0.0], [12.0, -13.0], [14.0, -15.0], [16.0, -17.0]]))


def test_weight_noise_is_relative_to_each_tensor_and_seeded():
    model = nn.Sequential(nn.Linear(200, 100), nn.Linear(100, 50))
    with torch.no_grad():
        model[1].weight.mul_(100.0)
    before = [m.weight.detach().clone() for m in model]
    add_weight_noise(model, 0.1, torch.Generator().manual_seed(3))
    for layer, w0 in zip(model, before):
        rms = w0.pow(2).mean().sqrt()
        change = (layer.weight.detach() - w0).pow(2).mean().sqrt()
        assert (change / rms).item() == pytest.approx(0.1, rel=0.05)
    again = nn.Sequential(nn.Linear(200, 100), nn.Linear(100, 50))
    with torch.no_grad():
        for a, w0 in zip(again, before):
            a.weight.copy_(w0)
    add_weight_noise(again, 0.1, torch.Generator().manual_seed(3))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(again, model))


@pytest.mark.parametrize("kind", ["int8", "int8_dynamic", "int4"])
def test_integer_formats_go_through_torchao_and_leave_the_model_alone(kind):
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(64, 32)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated torch.ao path
        quantized = Compression(kind).apply(model)
    assert all(type(m.weight).__module__.startswith("torchao") for m in (quantized[0], quantized[2]))
    assert not any(type(m).__module__.startswith("torch.ao") for m in quantized.modules())
    out = quantized(x)
    assert not torch.equal(out, reference)  # integer weights really changed the arithmetic
    assert (out - reference).abs().max() < (0.2 if kind == "int4" else 0.05) * reference.abs().max()
    assert all(type(m.weight) is nn.Parameter and type(m.weight.data) is torch.Tensor for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="no nn.Linear"):
        Compression(kind).apply(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match="already quantized"):
        Compression(kind).apply(quantized)


def test_int8_dynamic_quantizes_activations_where_int8_does_not():
    from torchao.quantization import quantize_

    from hf_gam.compression.deploy import torchao_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(8, 32)
    weights_only, dynamic = Compression("int8").apply(model), Compression("int8_dynamic").apply(model)
    assert not torch.equal(weights_only(x), dynamic(x))
    by_hand = copy.deepcopy(model)
    quantize_(by_hand, torchao_config("int8_dynamic"))
    assert torch.equal(by_hand(x), quantize_dynamic_int8(copy.deepcopy(model))(x))
    assert torch.equal(by_hand(x), dynamic(x))


def test_accuracy_skips_padding_labels():
    model = TwoLinear(torch.eye(2), torch.eye(2))
    batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), "labels": torch.tensor([0, 1, 1, -100])}
    assert accuracy(model, [batch]) == pytest.approx(2 / 3)


def _classifier_and_batches(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    for layer in (model[0], model[2]):  # weights of one scale, so that global pruning takes from both layers
        nn.init.normal_(layer.weight)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels=None):
            return {"logits": self.net(x)}

    x = torch.randn(96, 8)
    labels = model(x).argmax(-1).detach()  # the model is right on every example before compression
    return Wrapped(), [{"x": x[:48], "labels": labels[:48]}, {"x": x[48:], "labels": labels[48:]}]


def test_report_works_on_copies_and_leaves_model_gradients_mode_and_rng_alone():
    model, batches = _classifier_and_batches()
    model.train()
    loss = model(batches[0]["x"])["logits"].sum()
    loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    report = compression_report(model, batches)
    assert report["baseline"] == 1.0
    assert set(report) == {"baseline", "weights_8bit", "weights_4bit", "weights_3bit", "weights_2bit",
                           "pruned_50", "pruned_70", "pruned_90", "noise_0.1", "noise_0.2"}
    assert report["pruned_90"] < report["pruned_50"] <= 1.0  # pruning 90% of a random MLP hurts
    assert report["weights_8bit"] >= report["weights_2bit"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert compression_report(model, batches) == report  # seeded noise: the same numbers again
    table = format_table({"AdamW": report, "GAM": report})
    assert table.splitlines()[0] == "| | AdamW | GAM |"
    assert "| 90% of weights pruned (global magnitude) | " in table


def test_compression_names_parse_and_bad_levels_are_refused():
    texts = ("rtn:4", "int8_dynamic", "prune:0.9", "noise:0.05", "int8", "int4", "mlp:0.25", "mlp:0.5+int8")
    assert [Compression.parse(t).name for t in texts] == [
        "weights_4bit", "int8_dynamic", "pruned_90", "noise_0.05", "int8", "int4", "mlp_0.25", "mlp_0.5+int8"]
    assert [Compression.parse(t).spec for t in texts] == list(texts)
    assert [Compression.parse(t).deployable for t in texts] == [False, True, False, False, True, True, True, True]
    for bad in ("rtn:2.5", "prune:1.5", "noise:-1", "int8_dynamic:3", "prune", "zip:3", "rtn:x", "mlp:1", "mlp",
                "int8+int4", "mlp:0.5+mlp:0.2", "mlp:0.5+"):
        with pytest.raises(ValueError):
            Compression.parse(bad)
    model, batches = _classifier_and_batches()
    with pytest.raises(ValueError, match="either"):
        compression_report(model)
    assert compression_report(model, evaluate=lambda m: 0.5, compressions=["prune:0.5"]) == {
        "baseline": 0.5, "pruned_50": 0.5}


def _digits_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=10)
    torch.manual_seed(0)
    return ViTForImageClassification(config)


@pytest.mark.parametrize("at", ["evaluate", "train_end"])
def test_callback_logs_and_training_goes_on_bit_identically(tmp_path, at):
    from hf_gam import GAMConfig, GAMTrainer
    from hf_gam.measuring import stack_examples
    from hf_gam.vision.digits import digits_examples

    train, val = digits_examples("train")[:64], digits_examples("validation")[:40]

    def run(with_callback):
        args = GAMConfig(
            output_dir=str(tmp_path / str(with_callback)), per_device_train_batch_size=16, per_device_eval_batch_size=8,
            max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2, report_to=[], use_cpu=True,
            save_strategy="no", remove_unused_columns=False, disable_tqdm=True, gam_start=0.0,
            gam_rho_schedule="constant",
        )
        trainer = GAMTrainer(model=_digits_vit(), args=args, train_dataset=train, eval_dataset=val)
        callback = None
        if with_callback:
            callback = CompressionCallback.attach(trainer, num_examples=20, at=at,
                                                  compressions=["rtn:2", "prune:0.9", "noise:0.1", "int8_dynamic"])
        trainer.train()
        return trainer, callback

    plain, _ = run(False)
    trainer, callback = run(True)
    for p, q in zip(plain.model.parameters(), trainer.model.parameters()):
        assert torch.equal(p, q)  # the measurements changed nothing of the training
    logged = [h for h in trainer.state.log_history if "compression/pruned_90" in h]
    assert [h["step"] for h in logged] == ([2, 4] if at == "evaluate" else [4])
    assert [step for step, _ in callback.reports] == [h["step"] for h in logged]
    # The logged numbers are those of the final weights on the first 20 validation digits.
    independent = compression_report(trainer.model, [stack_examples(val[:20])],
                                     ["rtn:2", "prune:0.9", "noise:0.1", "int8_dynamic"])
    for name, value in independent.items():
        assert logged[-1][f"compression/{name}"] == pytest.approx(value), name


def test_callback_needs_examples():
    callback = CompressionCallback()
    with pytest.raises(ValueError, match="needs"):
        callback.on_train_end(None, None, None, model=_digits_vit())
    with pytest.raises(ValueError, match="'train_end' or 'evaluate'"):
        CompressionCallback(at="epoch")


def test_cli_measures_a_saved_checkpoint(tmp_path):
    from hf_gam.measuring import stack_examples
    from hf_gam.vision.digits import digits_examples

    model = _digits_vit()
    model.save_pretrained(tmp_path / "ckpt")
    out = subprocess.run(
        [sys.executable, "-m", "hf_gam.compression", str(tmp_path / "ckpt"), "--num-examples", "50",
         "--batch-size", "16", "--compressions", "rtn:4,prune:0.7,noise:0.1", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr, out.stderr  # the package must not import the module it runs
    assert "| 4-bit weights (round-to-nearest, per channel) |" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_examples"] == 50
    direct = compression_report(model, [stack_examples(digits_examples("test")[:50])], ["rtn:4", "prune:0.7", "noise:0.1"])
    for name, value in direct.items():
        assert result[name] == pytest.approx(value), name


def _imagefolder(root, classes, per_class):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("L", (8, 8), color=16 * c + i).save(root / name / f"{i}.png")
        (root / name / "notes.txt").write_text("not an image")


def test_imagefolder_sample_covers_every_class_with_the_models_labels(tmp_path):
    from hf_gam.commands import checkpoint_examples

    _imagefolder(tmp_path / "data" / "test", ["cat", "dog", "owl"], per_class=4)
    model = _digits_vit()
    model.config.label2id = {"owl": 0, "cat": 1, "dog": 2}
    model.config.id2label = {0: "owl", 1: "cat", 2: "dog"}
    batch = checkpoint_examples(str(tmp_path), model, str(tmp_path / "data"), "test", 6)
    assert batch["labels"].tolist() == [1, 2, 0, 1, 2, 0]  # classes in turn, each named by the model's label2id
    assert batch["pixel_values"].shape == (6, 1, 8, 8)
    assert batch["pixel_values"][0, 0, 0, 0].item() == pytest.approx(0 / 127.5 - 1)      # cat/0.png
    assert batch["pixel_values"][3, 0, 0, 0].item() == pytest.approx(1 / 127.5 - 1)      # cat/1.png
    assert batch["pixel_values"][5, 0, 0, 0].item() == pytest.approx(33 / 127.5 - 1)     # owl/1.png


def test_imagefolder_refuses_folders_the_model_does_not_name(tmp_path):
    from hf_gam.commands import checkpoint_examples

    _imagefolder(tmp_path, ["cat", "emu"], per_class=1)
    model = _digits_vit()
    model.config.label2id = {"cat": 0, "dog": 1}
    with pytest.raises(ValueError, match=r"\['emu'\]"):
        checkpoint_examples(str(tmp_path), model, str(tmp_path), "test", 10)
    model = _digits_vit()  # default names LABEL_k: folders in sorted order, at most num_labels of them
    assert checkpoint_examples(str(tmp_path), model, str(tmp_path), "test", 10)["labels"].tolist() == [0, 1]
    model.config.num_labels = 1
    with pytest.raises(ValueError, match="2 class folders; the model has 1"):
        checkpoint_examples(str(tmp_path), model, str(tmp_path), "test", 10)
