"""GAM across 2 CPU processes (gloo): DDP local and global modes, FSDP2, and `accelerate launch`."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hf_gam import GAMTrainer

from oracle import flat_gradient_fn, oracle_direction
from tiny import TinyClassifier, batch_of, flat_params, make_data, relative_error, sgd_args

HERE = os.path.dirname(os.path.abspath(__file__))
HPARAMS = dict(gam_grad_rho=0.05, gam_grad_norm_rho=0.3, gam_alpha=0.6, gam_beta=0.4, gam_gamma=0.5)


def launch(command, out_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command + [str(out_dir)], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            os.path.join("distributed", "gam_ranks.py")], out_dir)
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


def test_fsdp2_equals_one_process_on_the_global_batch(ranks):
    result = ranks("fsdp2")
    assert result["restored"] and not result["skipped"]
    torch.manual_seed(0)
    model = TinyClassifier()
    gradient, theta = flat_gradient_fn(model, batch_of(make_data(n=16, seed=0), 0, 16))
    expected = oracle_direction(gradient, theta, grad_rho=0.05, grad_norm_rho=0.3, alpha=0.6, beta=0.4, gamma=0.5)
    assert relative_error(flat(result["d"]), expected) < 1e-10


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
    assert all("gam/flatness" in h for h in result["log_history"] if "loss" in h)

    checkpoint = out_dir / f"checkpoint-{result['global_step']}"
    model = TinyClassifier(hidden=16, dtype=torch.float32)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, result["state_dict"][name]), name
