"""Exports (`hf_gam.compression.export`): smaller models that a fresh process loads with a plain `from_pretrained`,
whose outputs are the in-memory compressed model's; `mlp:F` as the full model with those neurons zeroed; the trained
model untouched; every bad input refused before anything is written."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from hf_gam.compression import (
    REPORT_NAME,
    Compression,
    export,
    mlp_blocks,
    mlp_keep_indices,
    recover_with_trainer,
    shrink_mlp,
)
from hf_gam.compression.deploy import require_torchao

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vit(seed=0, dtype=torch.float32):
    """A small ViT whose MLP is four times its width, with a convolutional patch embedding."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, num_labels=5)
    torch.manual_seed(seed)
    return ViTForImageClassification(config).to(dtype).eval()


def batches(seed=1, n=24):
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(n, 1, 16, 16, generator=generator),
             "labels": torch.randint(0, 5, (n,), generator=generator)}]


def logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
directory, inputs, out = sys.argv[1:]
model = AutoModelForImageClassification.from_pretrained(directory).eval()
processor = AutoImageProcessor.from_pretrained(directory)
with torch.no_grad():
    logits = model(pixel_values=torch.load(inputs)).logits
torch.save(logits, out)
print(json.dumps({"hf_gam_imported": any(name.split(".")[0] == "hf_gam" for name in sys.modules),
                  "intermediate_size": model.config.intermediate_size, "processor": type(processor).__name__}))
"""


@pytest.mark.parametrize("spec, bound", [("int8", 0.42), ("mlp:0.5+int8", 0.35)])
def test_export_is_smaller_loads_in_a_fresh_process_and_gives_the_compressed_logits(tmp_path, spec, bound):
    from transformers import ViTImageProcessor

    model = small_vit()
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    report = export(model, spec, str(tmp_path / "export"), batches=batches(), processor=processor,
                    latency_repeats=1, log=lambda _: None)
    directory = tmp_path / "export"
    assert sorted(os.listdir(directory)) == ["config.json", REPORT_NAME, "model.safetensors", "preprocessor_config.json"]
    assert report == json.loads((directory / REPORT_NAME).read_text())
    assert report["size_ratio"] <= bound
    assert report["compressed"]["weights_bytes"] == os.path.getsize(directory / "model.safetensors")

    pixel_values = batches(seed=7)[0]["pixel_values"]
    torch.save(pixel_values, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(directory), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"hf_gam_imported": False, "processor": "ViTImageProcessor",
                      "intermediate_size": 128 if spec.startswith("mlp") else 256}
    in_memory = logits(Compression.parse(spec).apply(model), pixel_values)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), in_memory, rtol=0, atol=1e-6)
    assert not torch.allclose(in_memory, logits(model, pixel_values), atol=1e-4)  # it is compressed
    # The reported accuracy is that of the model on disk.
    data = batches()[0]
    saved = type(model).from_pretrained(str(directory))
    expected = (logits(saved, data["pixel_values"]).argmax(-1) == data["labels"]).float().mean().item()
    assert report["compressed"]["accuracy"] == pytest.approx(expected)
    assert set(report["compressed"]["latency_ms"]) == {"batch_1", "batch_32"}


def test_mlp_pruning_equals_zeroing_the_same_neurons_in_the_full_model():
    model = small_vit(dtype=torch.float64)
    kept = mlp_keep_indices(model, 0.5)
    assert sorted(kept) == ["vit.layers.0", "vit.layers.1"]
    full = copy.deepcopy(model)
    for name, index in kept.items():
        mlp = full.get_submodule(name).mlp
        # The kept neurons are the ones with the largest ||W_in[j, :]|| ||W_out[:, j]||.
        score = mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)
        dropped = torch.tensor(sorted(set(range(256)) - set(index.tolist())))
        assert len(index) == len(dropped) == 128
        assert score[dropped].max() <= score[index].min()
        with torch.no_grad():
            mlp.fc2.weight[:, dropped] = 0.0
    smaller = shrink_mlp(copy.deepcopy(model), 0.5)
    assert smaller.config.intermediate_size == 128
    assert [smaller.get_submodule(n).mlp.fc1.out_features for n in kept] == [128, 128]
    pixel_values = batches()[0]["pixel_values"].double()
    torch.testing.assert_close(logits(smaller, pixel_values), logits(full, pixel_values), rtol=0, atol=1e-12)
    assert not torch.allclose(logits(smaller, pixel_values), logits(model, pixel_values), atol=1e-3)


def test_mlp_pruning_finds_the_intermediate_output_form():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=50)).eval()
    assert [b[1:] for b in mlp_blocks(model)] == [("intermediate.dense", "output.dense")] * 2
    smaller = Compression.parse("mlp:0.25").apply(model)
    assert smaller.config.intermediate_size == 48
    assert smaller.bert.encoder.layer[1].output.dense.in_features == 48
    assert model.bert.encoder.layer[1].output.dense.in_features == 64


def test_the_trained_model_is_bit_identical_after_every_export(tmp_path):
    model = small_vit()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for spec in ("int8", "int8_dynamic", "int4", "mlp:0.25", "mlp:0.5+int4"):
        report = export(model, spec, str(tmp_path / spec.replace(":", "_")), batches=batches(), latency_repeats=0,
                        log=lambda _: None)
        assert report["size_ratio"] < 1.0, spec
        assert "latency_ms" not in report["compressed"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and model.config.intermediate_size == 256
    assert getattr(model.config, "quantization_config", None) is None


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    model = small_vit()
    target = str(tmp_path / "out" / "variant")
    refusals = [
        (model, "zip", ValueError, "Unknown compression"),
        (model, "mlp:1.0", ValueError, r"in \[0, 1\)"),
        (model, "mlp:-0.5", ValueError, r"in \[0, 1\)"),
        (model, "int8:3", ValueError, "takes no level"),
        (model, "mlp:0.5+", ValueError, "Nothing follows"),
        (model, "int8+mlp:0.5", ValueError, "mlp:F followed by one other"),
        (model, "prune:0.9", ValueError, "stores nothing smaller"),
        (model, "rtn:4", ValueError, "stores nothing smaller"),
        (ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8],
                                                   depths=[1], num_labels=3)), "mlp:0.5", ValueError, "ViT"),
        (Compression.parse("int8").apply(model), "int8", ValueError, "already quantized"),
        (nn.Sequential(nn.Linear(2, 2)), "int8", TypeError, "PreTrainedModel"),
        (model, "mlp:0.3+int4", ValueError, r"multiples of 32: vit.layers.0.mlp.fc2 \(179\)"),
    ]
    for candidate, spec, error, match in refusals:
        with pytest.raises(error, match=match):
            export(candidate, spec, target, log=lambda _: None)
        assert not os.path.exists(tmp_path / "out"), spec
    os.makedirs(target)
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model, "int8", target, log=lambda _: None)
    assert os.listdir(target) == []
    export(model, "int8", target, overwrite=True, latency_repeats=0, log=lambda _: None)
    assert os.path.isfile(os.path.join(target, "model.safetensors"))


def test_an_export_that_fails_midway_leaves_no_directory_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import hf_gam.compression.exports as export_module

    model = small_vit()
    target = tmp_path / "variant"
    export(model, "int8", str(target), latency_repeats=0, log=lambda _: None)
    before = (target / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted while measuring, after the weights were written aside

    monkeypatch.setattr(export_module, "accuracy", broken)
    for path in (target, tmp_path / "other"):
        with pytest.raises(KeyboardInterrupt):
            export(model, "mlp:0.5+int8", str(path), batches=batches(), overwrite=True, latency_repeats=0,
                   log=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == ["variant"]  # no half-written directory, no leftovers beside it
    assert (target / "model.safetensors").read_bytes() == before


def test_a_missing_torchao_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=r'pip install "hf-gam\[deploy\]"'):
        require_torchao()
    with pytest.raises(ImportError, match="deploy"):
        export(small_vit(), "mlp:0.5+int8", str(tmp_path / "x"), log=lambda _: None)
    assert os.listdir(tmp_path) == []


def test_recovery_fine_tunes_the_smaller_model_with_the_given_step(tmp_path):
    from hf_gam import GAMConfig

    model = small_vit()
    data = batches(n=32)[0]
    rows = [{"pixel_values": data["pixel_values"][i], "labels": data["labels"][i]} for i in range(32)]
    args = GAMConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=16, learning_rate=1e-2,
                     use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no")
    plain = export(model, "mlp:0.5", str(tmp_path / "plain"), batches=[data], latency_repeats=0, log=lambda _: None)
    recovered = export(model, "mlp:0.5", str(tmp_path / "recovered"), batches=[data], latency_repeats=0,
                       recover=recover_with_trainer(rows, args, steps=4), log=lambda _: None)
    assert (plain["recovered"], recovered["recovered"]) == (False, True)
    assert recovered["compressed"]["parameters"] == plain["compressed"]["parameters"]
    a = type(model).from_pretrained(str(tmp_path / "plain"))
    b = type(model).from_pretrained(str(tmp_path / "recovered"))
    assert not torch.equal(a.vit.layers[0].mlp.fc1.weight, b.vit.layers[0].mlp.fc1.weight)
    assert recovered["compressed"]["accuracy"] > plain["compressed"]["accuracy"]  # 4 steps at 1e-2 fit 32 images
    assert args.max_steps == -1 and args.output_dir == str(tmp_path / "run")  # the caller's arguments untouched
    with pytest.raises(ValueError, match="positive"):
        recover_with_trainer(rows, args, steps=0)


def test_the_command_line_exports_a_saved_checkpoint(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "checkpoint")
    out = tmp_path / "exports"
    command = [sys.executable, "-m", "hf_gam.compression", str(tmp_path / "checkpoint"), "--export", "int8,mlp:0.5",
               "--output_dir", str(out), "--num-examples", "50", "--latency_repeats", "1", "--json",
               str(tmp_path / "exports.json")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["int8", "mlp_0.5"]
    saved = json.loads((tmp_path / "exports.json").read_text())
    assert sorted(saved["exports"]) == ["int8", "mlp:0.5"] and saved["num_examples"] == 50
    assert saved["exports"]["mlp:0.5"] == json.loads((out / "mlp_0.5" / REPORT_NAME).read_text())
    assert saved["exports"]["mlp:0.5"]["compressed"]["parameters"] < saved["exports"]["mlp:0.5"]["original"]["parameters"]
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    refused = subprocess.run(command[:5] + ["prune:0.9", "--output_dir", str(tmp_path / "none")],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "store nothing smaller" in refused.stderr
    assert not os.path.exists(tmp_path / "none")


def test_a_sharded_model_is_refused_before_anything_is_written(tmp_path):
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = small_vit()
        for layer in model.vit.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(NotImplementedError, match="unsharded"):
            export(model, "int8", str(tmp_path / "variant"), log=lambda _: None)
    finally:
        dist.destroy_process_group()
    assert os.listdir(tmp_path) == []
