"""GAM's state belongs to the model being trained; non-finite gradients never reach the weights; metrics in the
units README states; the smaller fixes (InstanceNorm, float64 inner products, empty-cache steps, host syncs)."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers import TrainerCallback, set_seed

import hf_gam.trainer
from hf_gam import GAMTrainer
from hf_gam.gam import GAMHyperParams, GAMStep, StepInputs, global_dot, norm_layers, weighted_norm

from oracle import flat_gradient_fn, oracle_direction
from tiny import SummedLossClassifier, TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)
ORACLE = dict(grad_rho=0.05, grad_norm_rho=0.3, alpha=0.6, beta=0.4, gamma=0.5)
HP = GAMHyperParams(**ORACLE)


class LogHistory(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# ---- state bound to the model of each train() ----

def test_model_init_builds_a_new_model_per_train_and_gam_follows_it(tmp_path):
    data = make_data()

    def model_init():
        return TinyClassifier()

    trainer = GAMTrainer(model_init=model_init, args=sgd_args(tmp_path, **HPARAMS), train_dataset=data)
    trainer.train()
    first = trainer.model
    trainer.train()  # a new model: GAM must not keep the first model's parameters
    assert trainer.model is not first
    set_seed(0)
    fresh = model_init()  # what the second train() started from: the Trainer seeds before `model_init`
    gradient, theta = flat_gradient_fn(fresh, batch_of(data, 0, 8))
    expected = oracle_direction(gradient, theta, **ORACLE)
    assert relative_error(theta - flat_params(trainer.model), expected) < 1e-10


class PerturbedOnlyBranch(TinyClassifier):
    """`extra` enters the loss only on the passes after the first of each step (a data-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.calls = 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.calls % 4 != 0:
            out["loss"] = out["loss"] + (self.extra**2).sum()
        self.calls += 1
        return out


def test_a_parameter_reached_only_at_perturbed_points_takes_no_part():
    torch.manual_seed(0)
    model = PerturbedOnlyBranch()
    batch = batch_of(make_data(), 0, 8)
    reference = TinyClassifier()
    reference.load_state_dict(model.state_dict(), strict=False)
    gradient, theta = flat_gradient_fn(reference, batch)
    expected = oracle_direction(gradient, theta, **ORACLE)

    def forward_backward(i):
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    GAMStep(model.parameters()).run(StepInputs(forward_backward, HP))
    assert model.extra.grad is None  # as the stock step leaves a parameter the loss at theta does not use
    d = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n != "extra"])
    assert relative_error(d, expected) < 1e-10


def test_a_parameter_unfrozen_after_the_first_step_gets_its_part_of_d(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data()
    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, **HPARAMS), train_dataset=data)
    trainer.current_gradient_accumulation_steps = 1
    batch = batch_of(data, 0, 8)
    model.net[0].bias.requires_grad_(False)
    trainer.training_step(model, dict(batch))
    model.zero_grad(set_to_none=True)
    model.net[0].bias.requires_grad_(True)
    trainer.training_step(model, dict(batch))
    gradient, theta = flat_gradient_fn(model, batch)
    expected = oracle_direction(gradient, theta, **ORACLE)
    d = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(d, expected) < 1e-10


# ---- non-finite gradients ----

class NaNAtPass(TinyClassifier):
    """Returns a NaN loss on the `at`-th forward call (counting from 0)."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at, self.calls = at, 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.calls == self.at:
            out["loss"] = out["loss"] * math.nan
        self.calls += 1
        return out


@pytest.mark.parametrize("at", [0, 1, 2, 3])
def test_without_a_loss_scaler_a_failed_micro_batch_contributes_nothing(tmp_path, at):
    torch.manual_seed(0)
    model = NaNAtPass(at)
    data = make_data(n=16)
    theta = flat_params(model)
    log = LogHistory()
    args = sgd_args(tmp_path, max_steps=2, learning_rate=0.1, logging_strategy="steps", logging_steps=1, **HPARAMS)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[log])
    after = []
    trainer.add_callback(type("Rec", (TrainerCallback,), {"on_step_end": lambda s, *a, **k: after.append(flat_params(model))})())
    trainer.train()
    assert torch.equal(after[0], theta)  # step 1: its only micro-batch failed, nothing moved
    assert torch.isfinite(after[1]).all() and not torch.equal(after[1], theta)
    assert [h["gam/skipped_steps"] for h in log.logs if "loss" in h] == [1, 0]


def test_failed_micro_batch_under_accumulation_keeps_the_others(tmp_path):
    """Accumulation of 2: the failed second micro-batch drops out, the first one's direction stays."""
    torch.manual_seed(0)
    model = NaNAtPass(at=6)  # pass 3 of the second micro-batch
    data = make_data(n=16)
    clean = TinyClassifier()
    clean.load_state_dict(model.state_dict())
    gradient, theta = flat_gradient_fn(clean, batch_of(data, 0, 8))
    expected = oracle_direction(gradient, theta, **ORACLE) / 2  # the loss is divided by the 2 accumulation steps
    args = sgd_args(tmp_path, gradient_accumulation_steps=2, **HPARAMS)
    GAMTrainer(model=model, args=args, train_dataset=data).train()
    assert relative_error(theta - flat_params(model), expected) < 1e-10


class ChannelsLastConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.head = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.head(self.conv(x).mean(dim=(2, 3)))
        return {"loss": nn.functional.cross_entropy(logits, labels)}


def test_non_finite_marker_works_for_a_channels_last_first_parameter():
    torch.manual_seed(0)
    model = ChannelsLastConv()
    assert not model.conv.weight.is_contiguous()
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 0, 1])
    calls = []

    def forward_backward(i):
        calls.append(i)
        loss = model(x, labels)["loss"]
        (loss * (math.inf if i == 1 else 1.0)).backward()
        return loss.detach()

    stats = GAMStep(model.parameters()).run(StepInputs(forward_backward, HP, nonfinite="mark"))
    assert bool(stats.failed)
    assert not torch.isfinite(model.conv.weight.grad).all()


# ---- metrics in the units README states ----

def micro_batch_metrics(model, batch):
    """||grad of the mean loss|| and ||g1 - g0|| / rho' for one micro-batch, in float64."""
    gradient, theta = flat_gradient_fn(model, batch)
    g0 = gradient(theta)
    g1 = gradient(theta + ORACLE["grad_rho"] * g0 / g0.norm())
    return g0.norm().item(), ((g1 - g0).norm() / ORACLE["grad_rho"]).item()


@pytest.mark.parametrize("model_class", [TinyClassifier, SummedLossClassifier])
def test_logged_norms_are_those_of_the_micro_batch_mean_loss(tmp_path, model_class):
    torch.manual_seed(0)
    model = model_class()
    data = make_data(n=16)
    expected = [micro_batch_metrics(model, batch_of(data, start, 8)) for start in (0, 8)]
    log = LogHistory()
    args = sgd_args(tmp_path, gradient_accumulation_steps=2, learning_rate=0.0, logging_strategy="steps",
                    logging_steps=1, **HPARAMS)
    GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[log]).train()
    row = next(h for h in log.logs if "loss" in h)
    assert row["gam/grad_norm"] == pytest.approx(sum(e[0] for e in expected) / 2, rel=1e-9)
    assert row["gam/flatness"] == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-9)


def test_logged_norms_do_not_depend_on_the_loss_scale(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=8)
    expected = micro_batch_metrics(model, batch_of(data, 0, 8))
    log = LogHistory()
    args = sgd_args(tmp_path, learning_rate=0.0, logging_strategy="steps", logging_steps=1, **HPARAMS)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data, callbacks=[log])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    trainer.train()
    row = next(h for h in log.logs if "loss" in h)
    assert row["gam/grad_norm"] == pytest.approx(expected[0], rel=1e-9)
    assert row["gam/flatness"] == pytest.approx(expected[1], rel=1e-9)


# ---- smaller fixes ----

class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6).double()
        self.norm = nn.InstanceNorm1d(2, track_running_stats=True).double()
        self.head = nn.Linear(6, 3).double()

    def forward(self, x, labels=None):
        h = self.norm(self.lin(x).view(-1, 2, 3)).view(-1, 6)
        return {"loss": nn.functional.cross_entropy(self.head(torch.tanh(h)), labels)}


def test_instance_norm_running_statistics_move_once_per_micro_batch():
    torch.manual_seed(0)
    model = InstanceNormNet()
    batch = batch_of(make_data(), 0, 8)
    once = copy.deepcopy(model)
    once(**batch)  # what pass 1 alone does to the running statistics

    def forward_backward(i):
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    GAMStep(model.parameters()).run(StepInputs(forward_backward, HP, norm_modules=norm_layers(model)))
    assert torch.equal(model.norm.running_mean, once.norm.running_mean)
    assert torch.equal(model.norm.running_var, once.norm.running_var)
    assert not torch.equal(once.norm.running_mean, InstanceNormNet().norm.running_mean)  # pass 1 did move them


def test_inner_products_of_large_float32_gradients_do_not_overflow():
    a = [torch.full((4,), 3e20, dtype=torch.float32)]
    b = [torch.full((4,), 2e20, dtype=torch.float32)]
    assert global_dot(a, b).item() == pytest.approx(4 * 6e40, rel=1e-6)
    assert weighted_norm(a, b).item() == pytest.approx(2 * 6e40, rel=1e-6)


def test_empty_cache_steps_are_honoured(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_gam.trainer, "clear_device_cache", lambda: calls.append(1))
    model = TinyClassifier()
    args = sgd_args(tmp_path, max_steps=4, torch_empty_cache_steps=2, **HPARAMS)
    GAMTrainer(model=model, args=args, train_dataset=make_data()).train()
    assert len(calls) == 2  # steps 0 and 2


class HostSyncCounter:
    """Counts the Tensor methods that make the host wait for the device's value."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("nonfinite, reuse, allowed", [("mark", False, 0), ("drop", False, 1), ("mark", True, 0)])
def test_host_synchronisations_per_micro_batch(monkeypatch, nonfinite, reuse, allowed):
    torch.manual_seed(0)
    model = TinyClassifier(batch_norm=True)
    batch = batch_of(make_data(), 0, 8)

    def forward_backward(i):
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    step = GAMStep(model.parameters())
    step.run(StepInputs(forward_backward, HP, norm_modules=norm_layers(model)), store_correction=True)
    model.zero_grad(set_to_none=True)
    counter = HostSyncCounter(monkeypatch)
    step.run(StepInputs(forward_backward, HP, norm_modules=norm_layers(model), nonfinite=nonfinite), reuse=reuse)
    count = counter.count
    monkeypatch.undo()
    assert count == allowed


def test_training_step_reads_no_device_value_with_a_loss_scaler(tmp_path, monkeypatch):
    model = TinyClassifier()
    data = make_data()
    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, **HPARAMS), train_dataset=data)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.current_gradient_accumulation_steps = 1
    batch = batch_of(data, 0, 8)
    trainer.training_step(model, dict(batch))  # the scaler creates its scale tensor
    model.zero_grad(set_to_none=True)
    counter = HostSyncCounter(monkeypatch)
    trainer.training_step(model, dict(batch))
    count = counter.count
    monkeypatch.undo()
    assert count == 0


def test_inner_products_are_exact_across_chunks(monkeypatch):
    """Tensors longer than a chunk are converted to float64 a piece at a time; the sums are unchanged."""
    import hf_gam.gam

    torch.manual_seed(0)
    a = [torch.randn(1000), torch.randn(7, 3)]
    b = [torch.randn(1000), torch.randn(7, 3)]
    exact = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    weighted = sum(((x.double() * y.double().abs()) ** 2).sum() for x, y in zip(a, b)).sqrt()
    monkeypatch.setattr(hf_gam.gam, "CHUNK", 64)
    assert global_dot(a, b).item() == pytest.approx(exact.item(), rel=1e-12)
    assert weighted_norm(a, b).item() == pytest.approx(weighted.item(), rel=1e-12)
