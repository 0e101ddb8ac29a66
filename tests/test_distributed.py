"""GAM across 2 CPU processes (gloo): DDP local and global modes, a non-finite pass on one rank, reuse steps, the
gradient-norm trigger, FSDP2 through `GAMTrainer.training_step`, and `accelerate launch`."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hf_gam import GAMTrainer

from oracle import flat_gradient_fn, oracle_direction
from test_cheap_gam import ORACLE, reuse_direction, stored_correction
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)


def launch(command, out_dir, timeout=600):
    # The ranks import this checkout's hf_gam, not whichever copy the interpreter has installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    result = subprocess.run(command + [str(out_dir)], cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    # Each collective of the ranks times out after 60 s (gam_ranks.TIMEOUT): a rank left waiting fails the run.
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            os.path.join("distributed", "gam_ranks.py")], out_dir, timeout=300)
    return lambda name: torch.load(os.path.join(out_dir, f"{name}.pt"))


def initial_params():
    torch.manual_seed(0)
    return flat_params(TinyClassifier())


def one_process(tmp_path, data, **overrides):
    """The displacement theta_0 - theta_end of a one-process run from the same initial model."""
    torch.manual_seed(0)
    model = TinyClassifier()
    GAMTrainer(model=model, args=sgd_args(tmp_path, **HPARAMS, **overrides), train_dataset=data).train()
    return initial_params() - flat_params(model)


def moved(result):
    """The displacement of a distributed run (rank 0's parameters; DDP keeps the ranks equal)."""
    return initial_params() - torch.cat([t.reshape(-1) for t in result["params"]])


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_local_mode_equals_one_process_accumulating_the_rank_batches(ranks, tmp_path):
    reference = one_process(tmp_path, make_data(n=16, seed=0), gradient_accumulation_steps=2)
    assert relative_error(moved(ranks("local")), reference) < 1e-10


def test_local_mode_with_accumulation(ranks, tmp_path):
    """2 ranks x 2 micro-batches of 4, 2 steps == one process accumulating 4 micro-batches of 4."""
    reference = one_process(tmp_path, make_data(n=64, seed=1), gradient_accumulation_steps=4,
                            per_device_train_batch_size=4, max_steps=2, learning_rate=0.1)
    assert relative_error(moved(ranks("local_accumulate")), reference) < 1e-10


def test_global_mode_equals_one_process_on_the_global_batch(ranks, tmp_path):
    reference = one_process(tmp_path, make_data(n=16, seed=0), per_device_train_batch_size=16)
    assert relative_error(moved(ranks("local")), reference) > 1e-6  # the two modes differ, so the check can fail
    assert relative_error(moved(ranks("global")), reference) < 1e-10


def test_global_mode_with_accumulation(ranks, tmp_path):
    reference = one_process(tmp_path, make_data(n=64, seed=1), gradient_accumulation_steps=2,
                            per_device_train_batch_size=8, max_steps=2, learning_rate=0.1)
    assert relative_error(moved(ranks("global_accumulate")), reference) < 1e-10


def test_collectives_per_optimizer_step(ranks):
    # local: one bucketed all-reduce per optimizer step, whatever the number of micro-batches; DDP reduces nothing.
    assert ranks("local")["calls"] == [{"all_reduce": 1, "ddp_buckets": 0}]
    assert ranks("local_accumulate")["calls"] == [{"all_reduce": 1, "ddp_buckets": 0}] * 2
    # global: one all-reduce per pass (4 passes x 2 micro-batches), none at the end.
    assert ranks("global")["calls"] == [{"all_reduce": 4, "ddp_buckets": 0}]
    assert ranks("global_accumulate")["calls"] == [{"all_reduce": 8, "ddp_buckets": 0}] * 2


def rank_steps(result):
    """Every rank's parameters after each optimizer step, checked finite and equal across the ranks."""
    steps = [r["steps"] for r in result["ranks"]]
    for params in zip(*steps):
        assert all(torch.isfinite(p).all() for p in params)
        assert all(torch.equal(p, params[0]) for p in params)
    return steps[0]


def test_nonfinite_pass_on_one_rank_drops_its_micro_batch_without_a_scaler(ranks):
    """Rank 1 alone gets an infinite loss at pass 3, and the forward runs a collective: every pass still runs on
    both ranks, and rank 1's micro-batch contributes zeros to the local mean (d of rank 0 over 2 ranks)."""
    result = ranks("nonfinite")
    assert [r["forwards"] for r in result["ranks"]] == [4, 4]
    (theta1,) = rank_steps(result)
    torch.manual_seed(0)
    gradient, theta = flat_gradient_fn(TinyClassifier(), batch_of(make_data(n=16, seed=0), 0, 8))
    expected = oracle_direction(gradient, theta, **ORACLE) / 2
    assert relative_error(moved(ranks("local")), expected) > 1e-3  # rank 1's batch counts when it is finite
    assert relative_error(theta - theta1, expected) < 1e-10
    assert [h["gam/skipped_steps"] for h in result["logs"] if "loss" in h] == [1]


def test_nonfinite_pass_on_one_rank_with_a_loss_scaler_skips_the_step_on_both(ranks):
    result = ranks("nonfinite_scaler")
    assert [r["forwards"] for r in result["ranks"]] == [4, 4]
    (theta1,) = rank_steps(result)
    assert torch.equal(theta1, initial_params())  # skipped: theta bit for bit
    assert [r["scale"] for r in result["ranks"]] == [torch.amp.GradScaler("cpu").get_scale() / 2] * 2  # lowered
    assert [h["gam/skipped_steps"] for h in result["logs"] if "loss" in h] == [1]


def direction_after_a_failed_full_step(theta0, theta):
    """Step 1 of the `nonfinite*_reuse` runs (a reuse step at `theta`): rank 0 reuses the correction of its full step
    at `theta0`; rank 1, whose full step failed, stored none and takes a plain gradient step; the ranks average."""
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=32, seed=0)
    full, _ = flat_gradient_fn(model, batch_of(data, 0, 8))
    rank0, _ = flat_gradient_fn(model, batch_of(data, 16, 8))
    rank1, _ = flat_gradient_fn(model, batch_of(data, 24, 8))
    return (reuse_direction(rank0, theta, stored_correction(full, theta0)[0]) + rank1(theta)) / 2


def test_reuse_after_a_nonfinite_full_step_without_a_scaler(ranks):
    """A full step whose passes failed stores a zero correction: the next reuse step stays finite."""
    result = ranks("nonfinite_reuse")
    assert [r["forwards"] for r in result["ranks"]] == [5, 5]
    theta1, theta2 = rank_steps(result)
    assert relative_error(theta1 - theta2, direction_after_a_failed_full_step(initial_params(), theta1)) < 1e-10
    assert [h["gam/skipped_steps"] for h in result["logs"] if "loss" in h] == [1, 0]


def test_reuse_after_a_nonfinite_full_step_with_a_loss_scaler(ranks):
    """The scaler skips the full step once; the reuse step after it is applied, and the scale is lowered once."""
    result = ranks("nonfinite_scaler_reuse")
    theta0 = initial_params()
    theta1, theta2 = rank_steps(result)
    assert torch.equal(theta1, theta0)
    assert relative_error(theta1 - theta2, direction_after_a_failed_full_step(theta0, theta0)) < 1e-10
    assert [r["scale"] for r in result["ranks"]] == [torch.amp.GradScaler("cpu").get_scale() / 2] * 2
    assert [h["gam/skipped_steps"] for h in result["logs"] if "loss" in h] == [1, 0]


def test_reuse_under_local_mode_keeps_one_all_reduce_per_step(ranks):
    """2 ranks x 2 micro-batches of 4: a full step, then a reuse step. Each rank reuses the correction of its own
    last full micro-batch; the local mode averages the accumulated directions once per step."""
    result = ranks("local_reuse")
    assert result["calls"] == [{"all_reduce": 1, "ddp_buckets": 0}] * 2
    assert [h["gam/passes"] for h in result["logs"] if "loss" in h] == [4, 1]
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=64, seed=1)
    # Rank r gets the batches r, r + 2, ... of 4 samples; each micro-batch's loss is divided by the 2 accumulation
    # steps, so are its g0 and d (the correction, per unit of ||g0||, is not).
    grads = [(lambda t, g=flat_gradient_fn(model, batch_of(data, 4 * k, 4))[0]: g(t) / 2) for k in range(8)]
    theta0, theta1 = initial_params(), result["steps"][0]
    full = sum(oracle_direction(grads[k], theta0, **ORACLE) for k in range(4)) / 2
    assert relative_error(theta0 - theta1, 0.1 * full) < 1e-10
    corrections = [stored_correction(grads[2], theta0)[0], stored_correction(grads[3], theta0)[0]]  # ranks 0 and 1
    reuse = sum(reuse_direction(grads[k], theta1, corrections[k % 2]) for k in range(4, 8)) / 2
    assert relative_error(theta1 - result["steps"][1], 0.1 * reuse) < 1e-10
    # The check tells the ranks' corrections apart.
    shared = sum(reuse_direction(grads[k], theta1, corrections[1]) for k in range(4, 8)) / 2
    assert relative_error(shared, reuse) > 1e-6


def test_trigger_under_local_mode_decides_alike_on_every_rank(ranks):
    """Rank 0's gradient norms rise over the 4 steps while rank 1's fall by as much (`RankScaledLoss`), and the
    forward runs a collective: each rank deciding on its own norm would part at step 1. On the squares averaged over
    the ranks (about 5e5, 5e3, 5e3, 5e5 in units of one unscaled gradient's) a full step runs at steps 0 and 3 only."""
    result = ranks("trigger")
    assert [r["forwards"] for r in result["ranks"]] == [10, 10]  # 4 + 1 + 1 + 4 passes
    rank_steps(result)
    assert [h["gam/passes"] for h in result["logs"] if "loss" in h] == [4, 1, 1, 4]


def test_fsdp2_training_step_equals_one_process_on_the_global_batch(ranks):
    """`GAMTrainer.training_step` on a `fully_shard` model: the full gradient is one-process GAM on the union of
    the ranks' batches, then (a reuse step) g0 + ||g0|| times the stored correction; theta is restored bit for bit."""
    result = ranks("fsdp2")
    full, reused = result["calls"]
    assert full["restored"] and reused["restored"]
    assert result["logs"]["gam/skipped_steps"] == 0 and result["logs"]["gam/passes"] == (4 + 1) / 2
    torch.manual_seed(0)
    model = TinyClassifier()
    data = make_data(n=32, seed=0)
    gradient, theta = flat_gradient_fn(model, batch_of(data, 0, 16))
    assert relative_error(flat(full["d"]), oracle_direction(gradient, theta, **ORACLE)) < 1e-10
    correction, _ = stored_correction(gradient, theta)
    gradient, _ = flat_gradient_fn(model, batch_of(data, 16, 16))
    expected = reuse_direction(gradient, theta, correction)
    assert relative_error(gradient(theta), expected) > 1e-3  # the correction matters
    assert relative_error(flat(reused["d"]), expected) < 1e-10


def test_compression_report_is_the_mean_over_ranks_on_every_rank(ranks):
    everyone = ranks("compression")
    local = [rank["local"] for rank in everyone]
    assert local[0] != local[1]  # the ranks measured different examples
    for rank in everyone:
        assert rank["reduced"] == pytest.approx({k: (local[0][k] + local[1][k]) / 2 for k in local[0]}, abs=1e-12)


def test_accelerate_launch_two_processes_trains_and_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file

    out_dir = tmp_path / "launch"
    # The launcher installed next to the Python running the tests (the venv may not be on PATH).
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate is not None, "accelerate's launcher must be installed next to the Python running the tests"
    launch([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join("distributed", "train_launch.py")],
           out_dir)
    result = torch.load(out_dir / "result.pt")
    assert result["world_size"] == 2
    losses = result["losses"]
    assert losses[-1] < 0.9 * losses[0], losses
    # PRETRAIN_GAM: stock DDP steps for the first 75% of the 32 steps, GAM after (the two paths in one run).
    logs = [h for h in result["log_history"] if "loss" in h]
    assert "gam/flatness" not in logs[0] and logs[0]["gam/passes"] == 1
    assert "gam/flatness" in logs[-1] and logs[-1]["gam/passes"] == 4

    checkpoint = out_dir / f"checkpoint-{result['global_step']}"
    model = TinyClassifier(hidden=16, dtype=torch.float32)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, result["state_dict"][name]), name
