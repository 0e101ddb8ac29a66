"""Flatness metrics against known Hessians, and the callback through a real Trainer run."""

import math
import os
import subprocess
import sys

import pytest
import torch

from hf_gam.flatness import (
    FlatnessCallback,
    first_order_flatness,
    hessian_trace,
    measure_flatness,
    top_hessian_eigenvalue,
)


def quadratic(n=12, seed=0, eigenvalues=None):
    """L(theta) = 0.5 theta^T A theta + b^T theta with A = Q diag(lambda) Q^T, theta split in two tensors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = eigenvalues if eigenvalues is not None else torch.linspace(-1.0, 3.0, n - 1, dtype=torch.float64)
    lam = torch.cat([lam, torch.tensor([6.0], dtype=torch.float64)])  # top eigenvalue 6, gap to 3
    a = q @ torch.diag(lam) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    p1 = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.randn(n - 5, generator=g, dtype=torch.float64))

    def loss_fn():
        theta = torch.cat([p1, p2])
        return 0.5 * theta @ a @ theta + b @ theta

    return a, b, [p1, p2], loss_fn, q[:, -1]


def test_top_eigenvalue_of_quadratic():
    a, _, params, loss_fn, _ = quadratic()
    truth = torch.linalg.eigvalsh(a)[-1].item()
    result = top_hessian_eigenvalue(loss_fn, params, iters=200, tol=1e-10)
    assert result["top_eigenvalue"] == pytest.approx(truth, rel=1e-6)
    assert result["iterations"] < 200


def test_top_eigenvalue_is_largest_in_magnitude():
    # A negative eigenvalue of larger magnitude wins: power iteration is honest about what it returns.
    _, _, params, loss_fn, _ = quadratic(eigenvalues=torch.tensor([-9.0] + [1.0] * 10, dtype=torch.float64))
    result = top_hessian_eigenvalue(loss_fn, params, iters=300, tol=1e-10)
    assert result["top_eigenvalue"] == pytest.approx(-9.0, rel=1e-5)


def test_trace_of_quadratic():
    a, _, params, loss_fn, _ = quadratic()
    truth = torch.trace(a).item()
    result = hessian_trace(loss_fn, params, samples=3000)
    assert abs(result["trace"] - truth) < 4 * result["trace_stderr"]
    assert result["trace"] == pytest.approx(truth, rel=0.05)
    # The standard error is that of Rademacher Hutchinson: var = 2 * sum_{i != j} A_ij^2.
    expected_se = math.sqrt(2 * ((a**2).sum() - (torch.diag(a) ** 2).sum()).item() / 3000)
    assert result["trace_stderr"] == pytest.approx(expected_se, rel=0.15)


def test_first_order_flatness_along_top_eigenvector():
    a, b, params, loss_fn, v1 = quadratic()
    theta_star = torch.linalg.solve(a, -b)
    delta, rho = 0.3, 0.1
    theta = theta_star + delta * v1  # gradient = 6 * delta * v1, so the max in the ball is 6 * (delta + rho)
    with torch.no_grad():
        params[0].copy_(theta[:5])
        params[1].copy_(theta[5:])
    before = [p.detach().clone() for p in params]
    result = first_order_flatness(loss_fn, params, rho=rho, steps=3)
    assert result["grad_norm"] == pytest.approx(6 * delta, rel=1e-9)
    assert result["max_grad_norm"] == pytest.approx(6 * (delta + rho), rel=1e-6)
    assert result["first_order_flatness"] == pytest.approx(rho * 6 * (delta + rho), rel=1e-6)
    for p, q in zip(params, before):
        assert torch.equal(p, q)  # parameters restored bit-exactly


def test_first_order_flatness_general_point_near_true_maximum():
    a, b, params, loss_fn, _ = quadratic(seed=3)
    rho = 0.2
    with torch.no_grad():
        theta0 = torch.cat([p.detach() for p in params])
        g0 = a @ theta0 + b
        # Reference: many projected gradient-ascent steps on ||g0 + A e||^2 over the ball.
        best = 0.0
        for start in range(20):
            e = torch.randn(len(g0), generator=torch.Generator().manual_seed(start), dtype=torch.float64)
            e = rho * e / e.norm()
            for _ in range(2000):
                e = e + 0.05 * a @ (g0 + a @ e)
                e = e * min(1.0, rho / e.norm().item())
            best = max(best, (g0 + a @ e).norm().item())
    result = first_order_flatness(loss_fn, params, rho=rho, steps=5)
    assert result["grad_norm"] == pytest.approx(g0.norm().item(), rel=1e-9)
    assert result["max_grad_norm"] <= best * (1 + 1e-9)
    assert result["max_grad_norm"] >= 0.97 * best
    assert result["max_grad_norm"] > result["grad_norm"] * 1.05


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x, labels=None):
        logits = self.frozen(self.net(x))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _tiny_net_batch():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(16, 3, generator=g, dtype=torch.float64), "labels": torch.randint(0, 2, (16,), generator=g)}


class CountingTinyNet(TinyNet):
    """TinyNet that records how many examples each forward pass sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, labels=None):
        self.seen.append(x.shape[0])
        return super().forward(x, labels)


def _exact_hessian(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def flat_loss(flat):
        chunks, offset = {}, 0
        for n, p in zip(names, params):
            chunks[n] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        model.eval()  # measurement is in eval mode: dropout off
        return torch.func.functional_call(model, chunks, (batch["x"], batch["labels"]))["loss"]

    return torch.autograd.functional.hessian(flat_loss, torch.cat([p.detach().reshape(-1) for p in params]))


def test_measure_flatness_matches_exact_hessian_of_a_network():
    model = TinyNet().double()
    batch = _tiny_net_batch()
    hess = _exact_hessian(model, batch)
    eig = torch.linalg.eigvalsh(hess)
    top = eig[eig.abs().argmax()].item()
    model.train()
    result = measure_flatness(model, batch, eig_iters=500, trace_samples=4000, metrics=("eigenvalue", "trace"))
    assert model.training  # mode restored
    assert result["top_eigenvalue"] == pytest.approx(top, rel=1e-3)
    assert abs(result["trace"] - torch.trace(hess).item()) < 4 * result["trace_stderr"] + 1e-9
    assert all(p.grad is None for p in model.parameters())


def test_chunked_measurement_equals_one_batch_and_the_exact_hessian():
    model = CountingTinyNet().double()
    batch = _tiny_net_batch()
    settings = dict(eig_iters=400, eig_tol=1e-14, trace_samples=20, rho=0.1, ascent_steps=3)
    whole = measure_flatness(model, batch, **settings)
    model.seen.clear()
    chunked = measure_flatness(model, batch, chunk_size=5, **settings)  # chunks of 5, 5, 5, 1: unequal weights
    assert max(model.seen) == 5 and set(model.seen) == {5, 1}  # no pass ever saw more than one chunk
    assert model.seen.count(5) == 3 * model.seen.count(1)  # ... and every pass went over all four chunks
    for key in ("loss", "top_eigenvalue", "trace", "trace_stderr", "grad_norm", "max_grad_norm"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=0), key
    eig = torch.linalg.eigvalsh(_exact_hessian(model, batch))
    assert chunked["top_eigenvalue"] == pytest.approx(eig[eig.abs().argmax()].item(), rel=1e-9)


def test_chunks_are_weighted_by_their_number_of_examples():
    # Batches of 12 and 4 examples: the mean over all 16 is not the mean of the two batch means.
    model = TinyNet().double()
    batch = _tiny_net_batch()
    halves = [{k: v[:12] for k, v in batch.items()}, {k: v[12:] for k, v in batch.items()}]
    whole = measure_flatness(model, batch, metrics=("eigenvalue",), eig_iters=50)
    split = measure_flatness(model, halves, chunk_size=None, metrics=("eigenvalue",), eig_iters=50)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert split["top_eigenvalue"] == pytest.approx(whole["top_eigenvalue"], rel=1e-12)
    unweighted = 0.5 * (measure_flatness(model, halves[0], metrics=())["loss"]
                        + measure_flatness(model, halves[1], metrics=())["loss"])
    assert unweighted != pytest.approx(whole["loss"], rel=1e-6)


def _digits_vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=10,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def test_callback_under_gam_trainer_measures_num_examples_across_eval_batches(tmp_path):
    from hf_gam import GAMConfig, GAMTrainer
    from hf_gam.measuring import stack_examples
    from hf_gam.vision.digits import digits_examples

    train = digits_examples("train")[:64]
    val = digits_examples("validation")[:40]
    args = GAMConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=8,
        max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2, report_to=[],
        use_cpu=True, save_strategy="no", remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = GAMTrainer(model=_digits_vit(tmp_path), args=args, train_dataset=train, eval_dataset=val)
    settings = dict(eig_iters=8, trace_samples=3, ascent_steps=2)
    # 20 examples: two and a half evaluation batches of 8, measured in chunks of 6.
    FlatnessCallback.attach(trainer, num_examples=20, chunk_size=6, **settings)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "flatness/top_eigenvalue" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert h["flatness/num_examples"] == 20
        for key in ("flatness/trace", "flatness/max_grad_norm", "flatness/first_order_flatness", "flatness/loss"):
            assert math.isfinite(h[key])
        assert h["flatness/max_grad_norm"] >= h["flatness/grad_norm"]
    # An independent measurement at the final weights on the first 20 validation examples, in one batch.
    last = logged[-1]
    independent = measure_flatness(trainer.model, stack_examples(val[:20]), **settings)
    for key in ("loss", "top_eigenvalue", "trace", "grad_norm", "max_grad_norm"):
        assert last[f"flatness/{key}"] == pytest.approx(independent[key], rel=1e-4), key
    # The first evaluation batch alone gives other numbers: the 20 examples were really used.
    first_batch = measure_flatness(trainer.model, stack_examples(val[:8]), **settings)
    assert first_batch["loss"] != pytest.approx(last["flatness/loss"], rel=1e-3)
    assert first_batch["top_eigenvalue"] != pytest.approx(last["flatness/top_eigenvalue"], rel=1e-3)
    assert "flatness/trace" in trainer.evaluate()


def test_callback_takes_fewer_examples_when_the_eval_set_is_smaller(caplog):
    from torch.utils.data import DataLoader

    from hf_gam.measuring import stack_examples, take_examples
    from hf_gam.vision.digits import digits_examples

    data = digits_examples("validation")[:13]
    with caplog.at_level("WARNING", logger="hf_gam.flatness"):
        batches = take_examples(DataLoader(data, batch_size=5, collate_fn=stack_examples), 50, "FlatnessCallback")
    assert [b["labels"].shape[0] for b in batches] == [5, 5, 3]
    assert "FlatnessCallback" in caplog.text and "has 13 examples" in caplog.text and "num_examples=50" in caplog.text
    assert [b["labels"].shape[0] for b in take_examples(
        DataLoader(data, batch_size=5, collate_fn=stack_examples), 7, "FlatnessCallback")] == [5, 2]


def test_cli_on_a_saved_checkpoint(tmp_path):
    from hf_gam.measuring import stack_examples
    from hf_gam.vision.digits import digits_examples

    model = _digits_vit(tmp_path)
    model.save_pretrained(tmp_path / "ckpt")
    out = subprocess.run(
        [sys.executable, "-m", "hf_gam.flatness", str(tmp_path / "ckpt"), "--num-examples", "32",
         "--chunk-size", "12", "--eig-iters", "3", "--trace-samples", "2", "--ascent-steps", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr, out.stderr  # the package must not import the module it runs
    import json

    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["num_examples"] == 32
    # The same 32 training digits in one batch, in this process.
    direct = measure_flatness(model, stack_examples(digits_examples("train")[:32]), eig_iters=3, trace_samples=2, ascent_steps=1)
    for key in ("loss", "top_eigenvalue", "trace", "max_grad_norm"):
        assert result[key] == pytest.approx(direct[key], rel=1e-4), key


def test_landscape_directions_curves_and_pictures(tmp_path):
    from hf_gam.landscape import filter_normalized_direction, loss_curve, loss_surface, plot_contour, plot_curves

    model = TinyNet()
    batch = {"x": torch.randn(8, 3), "labels": torch.randint(0, 2, (8,))}
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    direction = filter_normalized_direction(model, seed=0)
    assert len(direction) == len(params)
    for p, d in zip(params, direction):
        if p.dim() == 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.norm(dim=1), p.detach().norm(dim=1))
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    curve = loss_curve(model, batch, alphas)
    surface = loss_surface(model, batch, alphas)
    at_zero = measure_flatness(model, batch, metrics=())["loss"]
    assert curve[2] == pytest.approx(at_zero, rel=1e-6)
    assert surface[2][2] == pytest.approx(at_zero, rel=1e-6)
    assert len(set(curve)) == len(curve)  # the direction does move the loss
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    plot_curves({"a": [curve], "b": [curve, curve]}, alphas, str(tmp_path / "c.png"))
    plot_contour({"a": surface}, alphas, str(tmp_path / "s.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


DDP_SCRIPT = r'''
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_flatness import TinyNet, _ddp_batch
from hf_gam.flatness import measure_flatness
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
model = torch.nn.parallel.DistributedDataParallel(TinyNet().double())
full = _ddp_batch()
half = {k: v[rank * 8 : (rank + 1) * 8] for k, v in full.items()}
result = measure_flatness(model, half, eig_iters=30, trace_samples=5, rho=0.1, ascent_steps=2)
results = [None] * world
dist.all_gather_object(results, result)
if rank == 0:
    json.dump(results, open(sys.argv[1], "w"))
dist.barrier()  # both ranks done with gloo before either tears it down
dist.destroy_process_group()
'''


def _ddp_batch():
    g = torch.Generator().manual_seed(5)
    return {"x": torch.randn(16, 3, generator=g, dtype=torch.float64), "labels": torch.randint(0, 2, (16,), generator=g)}


def test_flatness_under_ddp_equals_one_process_on_the_union_batch(tmp_path):
    import json

    script = tmp_path / "ddp_flatness.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         str(script), str(out), os.path.join(repo, "tests")],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    assert per_rank[0] == per_rank[1]  # every rank reports the same numbers
    single = measure_flatness(TinyNet().double(), _ddp_batch(), eig_iters=30, trace_samples=5, rho=0.1, ascent_steps=2)
    for key in ("loss", "top_eigenvalue", "trace", "grad_norm", "max_grad_norm"):
        assert per_rank[0][key] == pytest.approx(single[key], rel=1e-8), key
