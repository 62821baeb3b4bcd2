"""Tests for grpo_kernels/reference.py against independent float64 computations."""

import ast
import pathlib
import statistics

import pytest
import torch

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.reference import fused_logprob_ref, group_advantage_ref


def _inputs(seed, n, v, h, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def _ref64(hidden, weight, targets, temperature):
    """Full-matrix float64 log-probs and entropy; returns (logp, ent, d_hidden, d_weight)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = (h @ w.T) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm[torch.arange(len(targets)), targets]
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp, ent, h, w


def _grads64(h, w, outputs, upstream):
    total = sum((o * u.double()).sum() for o, u in zip(outputs, upstream))
    return torch.autograd.grad(total, (h, w))


@pytest.mark.parametrize("n,v,h", [(1, 37, 13), (7, 37, 13), (33, 64, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_fused_logprob_matches_float64(n, v, h, temperature):
    hidden, weight, targets = _inputs(n * 100 + v, n, v, h)
    logp, ent = fused_logprob_ref(hidden, weight, targets, temperature=temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (n,)

    logp64, ent64, h64, w64 = _ref64(hidden, weight, targets, temperature)
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    up = (torch.randn(n, generator=g), torch.randn(n, generator=g))
    dh, dw = torch.autograd.grad((logp * up[0]).sum() + (ent * up[1]).sum(), (hidden, weight))
    dh64, dw64 = _grads64(h64, w64, (logp64, ent64), up)
    torch.testing.assert_close(dh.double(), dh64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-5)


def test_fused_logprob_without_entropy_returns_tensor_and_grads():
    hidden, weight, targets = _inputs(3, 9, 37, 13)
    logp = fused_logprob_ref(hidden, weight, targets, temperature=0.8)
    assert isinstance(logp, torch.Tensor) and logp.shape == (9,)
    logp64, _, h64, w64 = _ref64(hidden, weight, targets, 0.8)
    logp.sum().backward()
    dh64, dw64 = _grads64(h64, w64, (logp64,), (torch.ones(9),))
    torch.testing.assert_close(hidden.grad.double(), dh64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), dw64, rtol=1e-4, atol=1e-5)


def test_fused_logprob_bf16_inputs():
    hidden, weight, targets = _inputs(4, 16, 37, 13, dtype=torch.bfloat16)
    logp, ent = fused_logprob_ref(hidden, weight, targets, return_entropy=True)
    assert logp.dtype == torch.float32
    # The upcast is exact, so the forward is float32-accurate w.r.t. the bf16 values.
    logp64, ent64, h64, w64 = _ref64(hidden, weight, targets, 1.0)
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=1e-4, atol=1e-4)
    dh, dw = torch.autograd.grad(logp.sum() + ent.sum(), (hidden, weight))
    assert dh.dtype == dw.dtype == torch.bfloat16
    dh64, dw64 = _grads64(h64, w64, (logp64, ent64), (torch.ones(16), torch.ones(16)))
    torch.testing.assert_close(dh.double(), dh64, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), dw64, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n", [12, 10, 4, 0])
def test_fused_logprob_chunk_boundaries(monkeypatch, n):
    monkeypatch.setattr(reference, "CHUNK", 5)
    hidden, weight, targets = _inputs(5 + n, n, 37, 13)
    logp, ent = fused_logprob_ref(hidden, weight, targets, temperature=1.3, return_entropy=True)
    assert logp.shape == ent.shape == (n,)
    logp64, ent64, h64, w64 = _ref64(hidden, weight, targets, 1.3)
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent64.detach(), rtol=1e-5, atol=1e-5)
    if n:
        dh, dw = torch.autograd.grad(logp.sum() + 2 * ent.sum(), (hidden, weight))
        dh64, dw64 = _grads64(h64, w64, (logp64, ent64), (torch.ones(n), 2 * torch.ones(n)))
        torch.testing.assert_close(dh.double(), dh64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dw.double(), dw64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shapes,kwargs",
    [
        (((4, 13), (37, 12), (4,)), {}),
        (((4, 13), (37, 13), (5,)), {}),
        (((4, 13), (37, 13), (4,)), {"temperature": 0.0}),
    ],
)
def test_fused_logprob_errors(shapes, kwargs):
    h, w, t = shapes
    with pytest.raises(ValueError):
        fused_logprob_ref(torch.randn(h), torch.randn(w), torch.zeros(t, dtype=torch.long), **kwargs)


# ---------------------------------------------------------------- advantages


def _adv_loop(rewards, n, eps, norm_by_std, leave_one_out):
    out = []
    for i in range(0, len(rewards), n):
        grp = [float(x) for x in rewards[i:i + n]]
        std = statistics.stdev(grp) if n > 1 else 1.0
        for j, r in enumerate(grp):
            if leave_one_out:
                base = statistics.mean(grp[:j] + grp[j + 1:]) if n > 1 else 0.0
            else:
                base = statistics.mean(grp) if n > 1 else 0.0
            a = r - base
            out.append(a / (std + eps) if norm_by_std else a)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_group_advantage_modes(n, norm_by_std, leave_one_out):
    g = torch.Generator().manual_seed(10 * n + 2 * norm_by_std + leave_one_out)
    rewards = torch.randn(4 * n, generator=g)
    eps = 1e-3  # large enough that dropping eps would fail the comparison
    if norm_by_std and leave_one_out:  # RLOO is never divided by the std (verl's rloo): refused
        with pytest.raises(ValueError, match="norm_by_std=False"):
            group_advantage_ref(rewards, n, eps=eps, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
        return
    adv = group_advantage_ref(rewards, n, eps=eps, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    expected = _adv_loop(rewards.tolist(), n, eps, norm_by_std, leave_one_out)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)


def test_group_advantage_single_member_group_uses_unit_std():
    adv = group_advantage_ref(torch.tensor([2.0, -3.0]), 1)
    torch.testing.assert_close(adv, torch.tensor([2.0, -3.0]) / (1 + 1e-6))


@pytest.mark.parametrize("value", [0.1, 1.0, -7.3])
@pytest.mark.parametrize("norm_by_std,leave_one_out", [(True, False), (False, False), (False, True)])
def test_group_advantage_constant_group_is_zero(value, norm_by_std, leave_one_out):
    rewards = torch.cat([torch.full((8,), value), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])])
    adv = group_advantage_ref(rewards, 8, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().min() > 0.1


def test_group_advantage_accepts_integer_and_double_rewards():
    a = group_advantage_ref(torch.tensor([0, 1, 1, 1]), 2)
    b = group_advantage_ref(torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64), 2)
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "rewards,group_size",
    [(torch.zeros(2, 4), 4), (torch.zeros(7), 2), (torch.zeros(4), 0), (torch.zeros(4), -2)],
)
def test_group_advantage_errors(rewards, group_size):
    with pytest.raises(ValueError):
        group_advantage_ref(rewards, group_size)


def test_kernels_do_not_import_grpo_or_hpc():
    root = pathlib.Path(grpo_kernels.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("grpo", "hpc"), f"{path} imports {name}"
