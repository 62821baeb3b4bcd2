"""Tests for grpo/loss.py against hand computations and independent float64 formulas."""

import math

import pytest
import torch

from grpo.loss import AGG_MODES, KL_KINDS, agg_loss, kl_penalty, policy_loss


def _rand(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _mask(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) < 0.7
    m[0] = True
    m[-1] = False  # one fully masked sequence
    return m


# ---------------------------------------------------------------- kl_penalty

_KL_HAND = {
    "k1": lambda lp, rf: lp - rf,
    "abs": lambda lp, rf: abs(lp - rf),
    "k2": lambda lp, rf: 0.5 * (lp - rf) ** 2,
    "k3": lambda lp, rf: math.exp(rf - lp) - (rf - lp) - 1,
}
_ALIASES = {"k1": "kl", "abs": "abs", "k2": "mse", "k3": "low_var_kl"}


@pytest.mark.parametrize("kind", list(_KL_HAND))
def test_kl_penalty_matches_hand_formula(kind):
    logp, ref = _rand(1, 3, 5), _rand(2, 3, 5)
    expected = torch.tensor([[_KL_HAND[kind](a, b) for a, b in zip(r1, r2)]
                             for r1, r2 in zip(logp.tolist(), ref.tolist())], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logp, ref, kind), expected)
    torch.testing.assert_close(kl_penalty(logp, ref, _ALIASES[kind]), expected)


def test_kl_kinds_exported():
    assert set(KL_KINDS) == set(_KL_HAND) | set(_ALIASES.values())


def test_k3_clamps():
    logp = torch.tensor([0.0, 50.0, 0.0, 5.0])
    ref = torch.tensor([50.0, 0.0, 3.0, 0.0])
    out = kl_penalty(logp, ref, "k3")
    # ref-logp = 50 -> clamped kl 20 -> exp(20)-21 -> clamped to 10; ref-logp = -50 -> 19+e^-20 -> 10.
    assert out[0].item() == 10.0 and out[1].item() == 10.0
    assert out[2].item() == 10.0  # exp(3) - 4 = 16.09 > 10
    assert out[3].item() == pytest.approx(math.exp(-5) + 5 - 1)
    # k3 of huge differences must stay finite, also in the gradient.
    lp = torch.tensor([-1e4, 1e4], requires_grad=True)
    kl_penalty(lp, torch.zeros(2), "k3").sum().backward()
    assert torch.isfinite(lp.grad).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------- policy_loss, hand example

def _hand_batch():
    ratios = torch.tensor([[1.5, 0.5, 1.5, 5.0, 0.5, 10.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.full_like(ratios, -2.0)
    logp = (old + ratios.log()).requires_grad_()
    return logp, old, adv, mask


def test_policy_loss_hand_example():
    logp, old, adv, mask = _hand_batch()
    loss, metrics = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, clip_c=3.0)
    # per-token: A>0,r=1.5 -> -1.2 (clipped); A>0,r=.5 -> -.5; A<0,r=1.5 -> 1.5;
    # A<0,r=5 -> dual clip 3; A<0,r=.5 -> .8 (clipped); last token masked.
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 3.0 + 0.8) / 5)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 5)
    assert metrics["clipfrac_lower"].item() == pytest.approx(1 / 5)
    kl = -(2 * math.log(1.5) + 2 * math.log(0.5) + math.log(5.0)) / 5
    assert metrics["approx_kl"].item() == pytest.approx(kl)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())

    loss.backward()
    # d/dlogp of -A*r/5 where unclipped; zero where clipped, dual-clipped or masked.
    expected = torch.tensor([[0.0, -0.5 / 5, 1.5 / 5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_policy_loss_asymmetric_clip_and_clip_c():
    logp, old, adv, mask = _hand_batch()
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.4, clip_c=4.0)
    assert loss.item() == pytest.approx((-1.4 - 0.5 + 1.5 + 4.0 + 0.9) / 5)


# ---------------------------------------------------------------- policy_loss, random vs float64

def _per_token64(logp, old, adv, clip_low, clip_high, clip_c):
    """Closed form of the dual-clip loss, written differently from the implementation."""
    r = (logp - old).clamp(-20, 20).exp()
    pos = -adv * torch.minimum(r, torch.full_like(r, 1 + clip_high))
    neg = adv.abs() * torch.minimum(torch.maximum(r, torch.full_like(r, 1 - clip_low)),
                                    torch.full_like(r, clip_c))
    return torch.where(adv >= 0, pos, neg)


def _agg64(l, m, mode, num_tokens=None, num_seqs=None, max_len=None):
    m = m.double()
    B, T = l.shape
    seqs = num_seqs or B
    if mode == "token-mean":
        return (l * m).sum() / (num_tokens or max(m.sum().item(), 1))
    if mode == "seq-mean-token-sum":
        return sum((l[b] * m[b]).sum() for b in range(B)) / seqs
    if mode == "seq-mean-token-mean":
        return sum((l[b] * m[b]).sum() / (m[b].sum() + 1e-8) for b in range(B)) / seqs
    return (l * m).sum() / (max_len or T) / seqs


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clips", [(0.2, 0.2, 3.0), (0.2, 0.28, 10.0)])
def test_policy_loss_random_vs_float64(mode, dtype, clips):
    B, T = 4, 9
    old = _rand(3, B, T) - 2
    logp64 = old + _rand(4, B, T, scale=0.4)
    adv = _rand(5, B)
    mask = _mask(6, B, T)
    logp = logp64.to(dtype).requires_grad_()
    loss, metrics = policy_loss(logp, old.to(dtype), adv.to(dtype), mask,
                                clip_low=clips[0], clip_high=clips[1], clip_c=clips[2], agg=mode)

    ref_in = logp.detach().double().requires_grad_()
    adv_bt = adv[:, None].expand(B, T)
    ref_loss = _agg64(_per_token64(ref_in, old.to(dtype).double(), adv_bt, *clips), mask, mode)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol, abs=tol)

    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(logp.grad.double(), ref_in.grad, rtol=tol, atol=tol)

    r = (logp.detach().double() - old.to(dtype).double()).exp()
    m = mask.double()
    clipped = ((adv_bt > 0) & (r > 1 + clips[1])) | ((adv_bt < 0) & (r < 1 - clips[0]))
    lower = (adv_bt < 0) & (r > clips[2])
    assert metrics["clipfrac"].item() == pytest.approx(((clipped * m).sum() / m.sum()).item())
    assert metrics["clipfrac_lower"].item() == pytest.approx(((lower * m).sum() / m.sum()).item())
    kl = ((old.to(dtype).double() - logp.detach().double()) * m).sum() / m.sum()
    assert metrics["approx_kl"].item() == pytest.approx(kl.item(), rel=tol, abs=tol)
    assert 0 < metrics["clipfrac"].item() < 1  # the data actually exercises clipping


def test_policy_loss_advantage_broadcast_equivalence():
    B, T = 3, 7
    old, logp, adv, mask = _rand(7, B, T), _rand(8, B, T), _rand(9, B), _mask(10, B, T)
    for mode in AGG_MODES:
        a, ma = policy_loss(logp, old, adv, mask, agg=mode)
        b, mb = policy_loss(logp, old, adv[:, None].expand(B, T).clone(), mask, agg=mode)
        assert torch.equal(a, b)
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_policy_loss_global_normalisers_pass_through():
    B, T = 3, 6
    old, logp, adv, mask = _rand(11, B, T), _rand(12, B, T), _rand(13, B), _mask(14, B, T)
    base, _ = policy_loss(logp, old, adv, mask, agg="token-mean")
    scaled, _ = policy_loss(logp, old, adv, mask, agg="token-mean", num_tokens=4 * mask.sum())
    torch.testing.assert_close(scaled, base / 4)
    base, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm")
    scaled, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum-norm", num_seqs=2 * B, max_len=3 * T)
    torch.testing.assert_close(scaled, base / 6)


def test_policy_loss_old_logp_and_advantages_get_no_grad():
    old = _rand(15, 2, 3).requires_grad_()
    adv = _rand(16, 2).requires_grad_()
    logp = _rand(17, 2, 3).requires_grad_()
    loss, _ = policy_loss(logp, old, adv, torch.ones(2, 3))
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


@pytest.mark.parametrize(
    "kwargs,match",
    [({"clip_c": 1.0}, "clip_c"), ({"clip_c": 0.5}, "clip_c"), ({"agg": "mean"}, "token-mean")],
)
def test_policy_loss_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3), **kwargs)


def test_policy_loss_bad_advantage_shape():
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


# ---------------------------------------------------------------- agg_loss

@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("norms", [{}, {"num_tokens": 50, "num_seqs": 8, "max_len": 20}])
def test_agg_loss_vs_float64(mode, norms):
    l = _rand(20, 5, 11).float()
    m = _mask(21, 5, 11).float()
    got = agg_loss(l, m, mode, **norms)
    assert got.item() == pytest.approx(_agg64(l.double(), m, mode, **norms).item(), rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_ignores_nonfinite_padding(mode):
    l = _rand(22, 3, 4)
    m = _mask(23, 3, 4)
    dirty = l.masked_fill(~m, float("nan"))
    dirty[0, 0] = l[0, 0]
    assert torch.equal(agg_loss(dirty, m, mode), agg_loss(l, m, mode))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_mask_no_nan(mode):
    logp = _rand(24, 2, 5).requires_grad_()
    loss, metrics = policy_loss(logp, _rand(25, 2, 5), _rand(26, 2), torch.zeros(2, 5, dtype=torch.bool), agg=mode)
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 5, dtype=torch.float64))


def test_agg_loss_errors():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        agg_loss(torch.zeros(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="num_tokens"):
        agg_loss(torch.zeros(2, 3), torch.ones(2, 3), "token-mean", num_tokens=0)
    with pytest.raises(ValueError):
        agg_loss(torch.zeros(2, 3), torch.ones(2, 4), "token-mean")
