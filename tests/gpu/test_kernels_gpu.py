"""The Triton kernels on a GPU at real LM-head shapes, against float32/float64 torch references (tf32 off)."""

import pytest
import torch

import grpo_kernels
from grpo.loss import agg_loss, kl_penalty, policy_loss
from grpo_kernels import _lm_head as lm

DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _inputs(seed, n, v, h, dtype):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(n, h, device=DEV, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEV, generator=g) * 2 / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEV, generator=g)
    return hidden, weight, targets, g


def _ref(hidden, weight, targets, temperature, dtype=torch.float32):
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    logsm = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    return logsm[torch.arange(len(targets), device=DEV), targets], -(logsm.exp() * logsm).sum(-1), h, w


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_logprob_bf16_qwen_head():
    n, h, v = 1031, 3584, 152064  # odd N; the 7B head
    hidden, weight, targets, g = _inputs(0, n, v, h, torch.bfloat16)
    logp, ent = grpo_kernels.fused_logprob(hidden, weight, targets, temperature=0.9, return_entropy=True)
    lp32, ent32, h32, w32 = _ref(hidden, weight, targets, 0.9)
    torch.testing.assert_close(logp, lp32.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ent32.detach(), rtol=1e-4, atol=1e-4)
    up = torch.randn(n, device=DEV, generator=g), torch.randn(n, device=DEV, generator=g)
    (logp * up[0] + ent * up[1]).sum().backward()
    (lp32 * up[0] + ent32 * up[1]).sum().backward()
    assert _rel(hidden.grad, h32.grad) < 1e-2 and _rel(weight.grad, w32.grad) < 1e-2


def test_fused_logprob_fp32_odd_shape_against_float64():
    n, h, v = 300, 1000, 32003  # H not a multiple of the K block, V not a multiple of the vocab block
    hidden, weight, targets, g = _inputs(1, n, v, h, torch.float32)
    logp = grpo_kernels.fused_logprob(hidden, weight, targets, temperature=1.3)
    lp64, _, h64, w64 = _ref(hidden, weight, targets, 1.3, torch.float64)
    torch.testing.assert_close(logp.double(), lp64.detach(), rtol=1e-5, atol=1e-5)
    up = torch.randn(n, device=DEV, generator=g)
    (logp * up).sum().backward()
    (lp64 * up.double()).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_grad_kernel_writes_every_element():
    hidden, weight, targets, _ = _inputs(2, 301, 50001, 256, torch.bfloat16)
    f32 = dict(device=DEV, dtype=torch.float32)
    lse, logp, ent = (torch.empty(301, **f32) for _ in range(3))
    lm.forward_stats(hidden.detach(), weight.detach(), targets, 1.0, lse, logp, ent)
    out = torch.full((301, 50001), float("nan"), device=DEV, dtype=torch.bfloat16)
    c = torch.randn(301, **f32)
    lm.grad_logits(hidden.detach(), weight.detach(), targets, lse, ent, c, c, 1.0, out, has_ent=True)
    assert not out.isnan().any()


@pytest.mark.parametrize("kl_kind", ["low_var_kl", "k2"])
def test_fused_grpo_loss_bf16_several_chunks(monkeypatch, kl_kind):
    monkeypatch.setattr(lm, "BUFFER_BYTES", 1024 * 152064 * 2)  # 1024-row chunks: 3 of them
    b, t, h, v = 3, 700, 4096, 152064
    n = b * t
    hidden, weight, targets, g = _inputs(3, n, v, h, torch.bfloat16)
    lp = _ref(hidden, weight, targets, 1.0)[0].detach()
    old = lp + 0.3 * torch.randn(n, device=DEV, generator=g)
    ref = lp + 0.3 * torch.randn(n, device=DEV, generator=g)
    adv = torch.randn(b, device=DEV, generator=g).repeat_interleave(t)
    mask = torch.rand(b, t, device=DEV, generator=g) > 0.2
    scale = grpo_kernels.token_weights(mask, "seq-mean-token-mean").flatten()
    loss, _ = grpo_kernels.fused_grpo_loss(hidden, weight, targets, old_logp=old, advantages=adv, mask=mask.flatten(),
                                      scale=scale, ref_logp=ref, kl_coef=0.05, kl_kind=kl_kind, entropy_coef=0.01)
    loss.backward()
    lp32, ent32, h32, w32 = _ref(hidden, weight, targets, 1.0)
    lp32, ent32 = lp32.view(b, t), ent32.view(b, t)
    agg = "seq-mean-token-mean"
    pg, _ = policy_loss(lp32, old.view(b, t), adv.view(b, t), mask, agg=agg)
    ref_loss = pg - 0.01 * agg_loss(ent32, mask, agg) + 0.05 * agg_loss(kl_penalty(lp32, ref.view(b, t), kl_kind),
                                                                         mask, agg)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-4, atol=1e-5)
    assert _rel(hidden.grad, h32.grad) < 1e-2 and _rel(weight.grad, w32.grad) < 1e-2


def test_extra_memory_stays_under_one_gib_at_8k_tokens():
    n, h, v = 8192, 4096, 152064
    hidden, weight, targets, g = _inputs(4, n, v, h, torch.bfloat16)
    zeros = torch.zeros(n, device=DEV)
    for step in (lambda: grpo_kernels.fused_logprob(hidden, weight, targets).sum().backward(),
                 lambda: grpo_kernels.fused_grpo_loss(hidden, weight, targets, old_logp=zeros, advantages=zeros + 1,
                                                 mask=zeros + 1)[0].backward()):
        step()  # gradients allocated, kernels compiled
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        grads = hidden.grad.nbytes + weight.grad.nbytes
        extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**30
        assert extra < 1.0, f"{extra:.2f} GiB above inputs and gradients"
        hidden.grad = weight.grad = None


@pytest.mark.parametrize("n", [1, 5, 64, 33])
def test_group_advantage_gpu(n):
    r = torch.randn(4096 * n, device=DEV)
    for kw in (dict(), dict(norm_by_std=False), dict(leave_one_out=True, norm_by_std=False)):
        torch.testing.assert_close(grpo_kernels.group_advantage(r, n, **kw), grpo_kernels.group_advantage_ref(r, n, **kw),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tiles", ["128,256,64,8,8,3,0", "128,256,64,8,8,3,1", "128,128,64,8,8,4,1"])
def test_tile_variants_agree(monkeypatch, tiles):
    """Pointer loads and TMA descriptor loads, at an odd N and a V that is not a multiple of the vocab block."""
    t = lm.Tiles(*[int(x) for x in tiles.split(",")])
    for kind in ("fwd", "save", "grad"):
        monkeypatch.setitem(lm.TILES, (kind, torch.bfloat16), t)
    n, h, v = 777, 1024, 50001
    hidden, weight, targets, g = _inputs(5, n, v, h, torch.bfloat16)
    lp32, ent32, h32, w32 = _ref(hidden, weight, targets, 1.0)
    logp, ent = grpo_kernels.fused_logprob(hidden, weight, targets, return_entropy=True)
    torch.testing.assert_close(logp, lp32.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent, ent32.detach(), rtol=1e-4, atol=1e-4)
    (logp.sum() + ent.sum()).backward()
    (lp32.sum() + ent32.sum()).backward()
    assert _rel(hidden.grad, h32.grad) < 1e-2 and _rel(weight.grad, w32.grad) < 1e-2
    hidden.grad = weight.grad = None
    adv = torch.randn(n, device=DEV, generator=g)
    loss, st = grpo_kernels.fused_grpo_loss(hidden, weight, targets, old_logp=lp32.detach(), advantages=adv,
                                       mask=torch.ones(n, device=DEV), entropy_coef=0.1)
    loss.backward()
    lp32, ent32, h32, w32 = _ref(hidden, weight, targets, 1.0)
    ((-adv * torch.exp(lp32 - lp32.detach())).mean() - 0.1 * ent32.mean()).backward()
    torch.testing.assert_close(st["logp"], lp32.detach(), rtol=1e-4, atol=1e-4)
    assert _rel(hidden.grad, h32.grad) < 1e-2 and _rel(weight.grad, w32.grad) < 1e-2
