"""Loss scaling (fp16 with a GradScaler), non-finite gradients, bf16 autocast and 16-bit parameters."""

import copy
import logging

import torch
from transformers import TrainerCallback

from hf_gam import GAMTrainer
from hf_gam.gam import GAMHyperParams, GAMStep, StepInputs, norm_layers

from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

HP = GAMHyperParams(grad_rho=0.05, grad_norm_rho=0.3, gamma=0.5)


def pass_runner(model, batch, scale=1.0, overflow_at=None, calls=None):
    def forward_backward(i):
        if calls is not None:
            calls.append(i)
        loss = model(**batch)["loss"]
        factor = float("inf") if i == overflow_at else scale
        (loss * factor).backward()
        return loss.detach()

    return forward_backward


def test_direction_is_linear_in_the_loss_scale():
    """A loss scale cancels in every perturbation and multiplies d: no unscaling is needed inside the step."""
    torch.manual_seed(0)
    model = TinyClassifier()
    batch = batch_of(make_data(n=8), 0, 8)
    GAMStep(model.parameters()).run(StepInputs(pass_runner(model, batch), HP))
    plain = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    GAMStep(model.parameters()).run(StepInputs(pass_runner(model, batch, scale=2.0**20), HP))
    scaled = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert relative_error(scaled / 2.0**20, plain) < 1e-10


def test_overflow_in_a_later_pass_restores_and_leaves_a_non_finite_gradient():
    """With a loss scaler ("mark"): every pass still runs (ranks stay in step), theta comes back bit for bit, and a
    non-finite gradient is left so that the scaler skips the step."""
    torch.manual_seed(1)
    model = TinyClassifier(batch_norm=True, dtype=torch.float32)
    batch = batch_of(make_data(n=8, dtype=torch.float32), 0, 8)
    model(**batch)["loss"].backward()  # an earlier micro-batch's gradient, set aside during the passes
    earlier = [p.grad.clone() for p in model.parameters()]
    before = copy.deepcopy(model)
    calls = []
    stats = GAMStep(model.parameters()).run(StepInputs(pass_runner(model, batch, overflow_at=2, calls=calls), HP,
                                                       norm_modules=norm_layers(model), nonfinite="mark"))
    assert bool(stats.failed) and not stats.dropped
    assert calls == [0, 1, 2, 3]
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.net[1].track_running_stats and model.net[1].num_batches_tracked.item() == 2
    assert any(not torch.equal(p.grad, e) for p, e in zip(model.parameters(), earlier))


class RecordParams(TrainerCallback):
    def __init__(self, model, scaler):
        self.model, self.scaler, self.after = model, scaler, []

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append((flat_params(self.model), self.scaler.get_scale()))


def test_grad_scaler_overflow_skips_the_step_and_training_goes_on(tmp_path):
    torch.manual_seed(2)
    model = TinyClassifier(dtype=torch.float32)
    model.net[1] = torch.nn.Identity()  # no tanh: gradients grow with the inputs
    theta = flat_params(model)
    data = [{"x": 100 * r["x"], "labels": r["labels"]} for r in make_data(n=24, dtype=torch.float32, seed=2)]
    init_scale = 2.0**127
    # Precondition: at the first scale, a plain backward already overflows float32 gradients.
    probe = copy.deepcopy(model)
    (probe(**batch_of(data, 0, 8))["loss"] * torch.tensor(init_scale)).backward()
    assert not all(torch.isfinite(p.grad).all() for p in probe.parameters())
    # No clipping: on CPU Accelerate unscales before clipping only with fp16 autocast, which CPU runs lack; the
    # scaler then unscales inside its own step. (The fp16 + clipping path runs in benchmarks/gpu_check.sh.)
    args = sgd_args(tmp_path, max_steps=3, learning_rate=0.1, logging_strategy="steps", logging_steps=1)
    trainer = GAMTrainer(model=model, args=args, train_dataset=data)
    # Accelerate creates no GradScaler on CPU: install one whose first scale overflows float32 gradients.
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-100, growth_interval=1000)
    lowered = (torch.tensor(init_scale) * 2.0**-100).item()
    trainer.accelerator.scaler = scaler
    recorder = RecordParams(model, scaler)
    trainer.add_callback(recorder)
    trainer.train()

    params_1, scale_1 = recorder.after[0]
    assert torch.equal(params_1, theta)  # skipped: theta bit for bit, no NaN
    assert scale_1 == lowered  # lowered by the backoff factor
    assert trainer.state.log_history[0]["gam/skipped_steps"] == 1
    assert "gam/grad_norm" not in trainer.state.log_history[0]  # no mean over zero finished micro-batches
    assert trainer.state.log_history[1]["gam/grad_norm"] > 0
    final, final_scale = recorder.after[-1]
    assert torch.isfinite(final).all() and not torch.equal(final, theta)
    assert final_scale == lowered
    assert [h["gam/skipped_steps"] for h in trainer.state.log_history if "loss" in h] == [1, 0, 0]


def test_bf16_autocast_trains(tmp_path):
    torch.manual_seed(3)
    model = TinyClassifier(dtype=torch.float32)
    data = make_data(n=16, dtype=torch.float32, seed=3)
    fp32 = copy.deepcopy(model)
    fp32_start = copy.deepcopy(model)
    GAMTrainer(model=fp32, args=sgd_args(tmp_path, max_steps=2, learning_rate=0.1), train_dataset=data).train()
    trainer = GAMTrainer(model=model, args=sgd_args(tmp_path, max_steps=2, learning_rate=0.1, bf16=True),
                         train_dataset=data)
    theta = flat_params(fp32_start)
    trainer.train()
    params = flat_params(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(params).all()
    assert all(h.get("gam/skipped_steps", 0) == 0 for h in trainer.state.log_history)
    # bf16 arithmetic changes the steps a little, not a lot: compared on the displacement, so that a run that skipped
    # its steps (no displacement at all) fails.
    moved_fp32 = flat_params(fp32) - theta
    assert moved_fp32.norm() > 1e-3 * theta.norm()
    assert 0 < relative_error(params - theta, moved_fp32) < 0.1


def test_sixteen_bit_parameters_warn(tmp_path, caplog):
    model = TinyClassifier(dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="hf_gam.trainer"):
        GAMTrainer(model=model, args=sgd_args(tmp_path), train_dataset=make_data(dtype=torch.bfloat16))
    assert any("16-bit" in r.getMessage() for r in caplog.records)
