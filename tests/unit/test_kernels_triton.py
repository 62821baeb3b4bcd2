"""The Triton kernels on the CPU under TRITON_INTERPRET=1, small odd shapes, against float64 references.

Triton picks the interpreter when it decorates a kernel, so TRITON_INTERPRET must be set before the kernels are
imported. To keep it out of every other test, the interpreted tests run in a child pytest process started by
`test_interpreted_kernels` below (the variable is set only in the child's environment).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:

    def test_interpreted_kernels():
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        print(r.stdout[-3000:])
        assert r.returncode == 0, f"interpreted kernel tests failed:\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"

    def test_cpu_tensors_without_interpreter_raise_one_clear_error():
        import grpo_kernels
        hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
        assert not grpo_kernels.triton_available("cpu")
        with pytest.raises(ValueError, match="needs CUDA tensors.*grpo_kernels.reference"):
            grpo_kernels.fused_logprob(hidden, weight, targets)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            grpo_kernels.group_advantage(torch.randn(6), 3)
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            grpo_kernels.fused_grpo_loss(hidden, weight, targets, old_logp=torch.zeros(4), advantages=torch.zeros(4),
                                    mask=torch.ones(4))

else:
    import grpo_kernels
    from grpo.loss import agg_loss, kl_penalty, policy_loss
    from grpo_kernels import _lm_head as lm
    from grpo_kernels import fused_grpo_loss, fused_logprob, group_advantage, group_advantage_ref, token_weights

    def _inputs(seed, n, v, h, dtype):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), generator=g)
        return hidden, weight, targets, g

    def _ref64(hidden, weight, targets, temperature):
        h = hidden.detach().double().requires_grad_()
        w = weight.detach().double().requires_grad_()
        logsm = torch.log_softmax((h @ w.T) / temperature, dim=-1)
        return logsm[torch.arange(len(targets)), targets], -(logsm.exp() * logsm).sum(-1), h, w

    def _close(actual, expected, dtype, *, what, f32_tol=1e-4, bf16_rel=1e-2):
        """float32: elementwise; bf16 gradients: relative norm (rounding of each element is 2^-8)."""
        if dtype == torch.float32:
            torch.testing.assert_close(actual.double(), expected.double(), rtol=f32_tol, atol=f32_tol, msg=what)
        else:
            err = ((actual.double() - expected).norm() / expected.norm()).item()
            bad = ((actual.double() - expected).abs() > 0.05 * expected.abs().max()).sum().item()
            assert err < bf16_rel, f"{what}: relative error {err:.2e} >= {bf16_rel}; {bad} elements off by >5% of max"

    @pytest.mark.parametrize("n,v,h,dtype,temperature", [
        (1, 37, 13, torch.float32, 1.0),
        (37, 300, 40, torch.float32, 0.7),
        (1, 37, 13, torch.bfloat16, 1.3),
        (37, 300, 40, torch.bfloat16, 1.0),
    ])
    def test_fused_logprob_forward_backward_float64(n, v, h, dtype, temperature):
        hidden, weight, targets, g = _inputs(n * 7 + v, n, v, h, dtype)
        logp, ent = fused_logprob(hidden, weight, targets, temperature=temperature, return_entropy=True)
        assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (n,)
        lp64, ent64, h64, w64 = _ref64(hidden, weight, targets, temperature)
        # The forward accumulates exact products of the inputs in float32, for bf16 too.
        torch.testing.assert_close(logp.double(), lp64.detach(), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent.double(), ent64.detach(), rtol=1e-5, atol=2e-5)
        up = torch.randn(n, generator=g), torch.randn(n, generator=g)
        (logp * up[0] + ent * up[1]).sum().backward()
        (lp64 * up[0].double() + ent64 * up[1].double()).sum().backward()
        assert hidden.grad.dtype == weight.grad.dtype == dtype
        _close(hidden.grad, h64.grad, dtype, what="d_hidden")
        _close(weight.grad, w64.grad, dtype, what="d_weight")

    def test_fused_logprob_many_chunks_without_entropy(monkeypatch):
        monkeypatch.setattr(lm, "BUFFER_BYTES", 1)  # 128-row chunks: d_weight sums 3 chunks
        monkeypatch.setattr(lm, "FWD_ROWS", 128)
        hidden, weight, targets, g = _inputs(5, 300, 45, 24, torch.float32)
        logp = fused_logprob(hidden, weight, targets, temperature=0.9)
        assert isinstance(logp, torch.Tensor)
        lp64, _, h64, w64 = _ref64(hidden, weight, targets, 0.9)
        torch.testing.assert_close(logp.double(), lp64.detach(), rtol=1e-5, atol=2e-5)
        up = torch.randn(300, generator=g)
        (logp * up).sum().backward()
        (lp64 * up.double()).sum().backward()
        _close(hidden.grad, h64.grad, torch.float32, what="d_hidden")
        _close(weight.grad, w64.grad, torch.float32, what="d_weight")

    def test_fused_logprob_frozen_weight_no_grad_and_empty():
        hidden, weight, targets, _ = _inputs(6, 20, 33, 16, torch.float32)
        weight.requires_grad_(False)
        logp = fused_logprob(hidden, weight, targets)
        logp.sum().backward()
        assert weight.grad is None and hidden.grad is not None
        with torch.no_grad():
            again = fused_logprob(hidden, weight, targets)
        assert not again.requires_grad
        torch.testing.assert_close(again, logp.detach(), rtol=0, atol=0)
        empty, ent = fused_logprob(hidden[:0], weight, targets[:0], return_entropy=True)
        assert empty.shape == ent.shape == (0,)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(temperature=0.0), "temperature"),
        (dict(hidden=torch.randn(4, 9)), "expected hidden"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), "targets of shape"),
        (dict(hidden=torch.randn(4, 8, dtype=torch.float64)), "share one dtype"),
        (dict(targets=torch.zeros(4)), "token ids"),
    ])
    def test_fused_logprob_errors(kwargs, match):
        args = dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.long))
        temperature = kwargs.pop("temperature", 1.0)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            fused_logprob(**args, temperature=temperature)

    def _grpo_case(seed, b, t, v, h, dtype):
        n = b * t
        hidden, weight, targets, g = _inputs(seed, n, v, h, dtype)
        lp = _ref64(hidden, weight, targets, 0.8)[0].detach()
        # Wide spread of log-ratios so that both clips and the dual clip are hit.
        old = (lp + torch.randn(n, generator=g, dtype=torch.float64)).float()
        ref = (lp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).float()
        adv = torch.randn(b, generator=g).repeat_interleave(t)
        mask = torch.rand(b, t, generator=g) > 0.25
        mask[0] = True
        old[~mask.flatten()] = float("nan")  # masked tokens must not leak NaN
        return hidden, weight, targets, old, ref, adv, mask

    def _grpo_ref64(hidden, weight, targets, old, ref, adv, mask, *, agg, kl_kind, kl_coef, ent_coef, clip_c, **norm):
        b, t = mask.shape
        lp, ent, h64, w64 = _ref64(hidden, weight, targets, 0.8)
        lp, ent = lp.view(b, t), ent.view(b, t)
        pg, metrics = policy_loss(lp, old.double().view(b, t), adv.double().view(b, t), mask, clip_c=clip_c, agg=agg,
                                  **norm)
        loss = pg - ent_coef * agg_loss(ent, mask, agg, **norm)
        if ref is not None:
            loss = loss + kl_coef * agg_loss(kl_penalty(lp, ref.double().view(b, t), kl_kind), mask, agg, **norm)
        return loss, metrics, h64, w64

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("kl_kind,agg", [
        ("k1", "token-mean"), ("abs", "seq-mean-token-sum"), ("k2", "seq-mean-token-mean"),
        ("low_var_kl", "seq-mean-token-sum-norm"),
    ])
    def test_fused_grpo_loss_matches_grpo_loss_float64(dtype, kl_kind, agg):
        hidden, weight, targets, old, ref, adv, mask = _grpo_case(11, 3, 7, 70, 24, dtype)
        norm = dict(num_tokens=40, num_seqs=5, max_len=9)
        scale = token_weights(mask, agg, **norm).flatten()
        cfg = dict(kl_kind=kl_kind, kl_coef=0.1, ent_coef=0.02, clip_c=2.0)
        loss, st = fused_grpo_loss(hidden, weight, targets, old_logp=old, advantages=adv, mask=mask.flatten(),
                                   scale=scale, ref_logp=ref, kl_coef=0.1, kl_kind=kl_kind, entropy_coef=0.02,
                                   temperature=0.8, clip_c=2.0)
        (2.5 * loss).backward()  # an upstream gradient other than 1
        ref_loss, metrics, h64, w64 = _grpo_ref64(hidden, weight, targets, old, ref, adv, mask, agg=agg, **cfg, **norm)
        (2.5 * ref_loss).backward()
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        _close(hidden.grad, h64.grad, dtype, what="d_hidden")
        _close(weight.grad, w64.grad, dtype, what="d_weight")
        for k in ("clipfrac", "clipfrac_lower", "approx_kl"):
            torch.testing.assert_close(st[k].double(), metrics[k], rtol=1e-5, atol=1e-6, msg=k)
        assert st["logp"].shape == st["entropy"].shape == st["pg"].shape == st["kl"].shape == (21,)

    def test_fused_grpo_loss_on_policy_without_old_logp():
        """old_logp=None (one optimizer step per batch): the float64 reference with old = the policy's own log-probs,
        ratio 1 everywhere, so no clipping; gradients flow through the ratio."""
        hidden, weight, targets, _, ref, adv, mask = _grpo_case(14, 3, 7, 70, 24, torch.float32)
        loss, st = fused_grpo_loss(hidden, weight, targets, old_logp=None, advantages=adv, mask=mask.flatten(),
                                   ref_logp=ref, kl_coef=0.1, entropy_coef=0.02, temperature=0.8)
        loss.backward()
        own = _ref64(hidden, weight, targets, 0.8)[0].detach().float()
        ref_loss, metrics, h64, w64 = _grpo_ref64(hidden, weight, targets, own, ref, adv, mask, agg="token-mean",
                                                  kl_kind="low_var_kl", kl_coef=0.1, ent_coef=0.02, clip_c=3.0)
        ref_loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        _close(hidden.grad, h64.grad, torch.float32, what="d_hidden")
        _close(weight.grad, w64.grad, torch.float32, what="d_weight")
        assert float(st["clipfrac"]) == 0 and float(st["approx_kl"]) == 0
        assert hidden.grad.abs().sum() > 0

    def test_fused_grpo_loss_hits_dual_clip_and_reports_terms():
        hidden, weight, targets, old, ref, adv, mask = _grpo_case(12, 4, 9, 50, 16, torch.float32)
        loss, st = fused_grpo_loss(hidden, weight, targets, old_logp=old, advantages=adv, mask=mask.flatten(),
                                   ref_logp=ref, kl_coef=0.3, entropy_coef=0.05, temperature=0.8, clip_c=1.5)
        assert st["clipfrac"] > 0 and st["clipfrac_lower"] > 0
        m = mask.flatten()
        w = 1.0 / m.sum()
        terms = st["pg_loss"] + 0.3 * st["kl_loss"] - 0.05 * st["entropy_loss"]
        torch.testing.assert_close(terms, loss.detach(), rtol=1e-5, atol=1e-6)
        b, t = mask.shape
        lp64, ent64, _, _ = _ref64(hidden, weight, targets, 0.8)
        torch.testing.assert_close(st["entropy_loss"].double(), (ent64.detach() * m * w).sum(), rtol=1e-5, atol=1e-6)
        kl64 = kl_penalty(lp64.detach().view(b, t), ref.double().view(b, t), "k3")
        torch.testing.assert_close(st["kl_loss"].double(), agg_loss(kl64, mask, "token-mean"), rtol=1e-5, atol=1e-6)

    def test_fused_grpo_loss_chunks_accumulation_and_frozen_weight(monkeypatch):
        monkeypatch.setattr(lm, "BUFFER_BYTES", 1)  # 128-row chunks
        hidden, weight, targets, old, ref, adv, mask = _grpo_case(13, 3, 100, 40, 16, torch.float32)
        m = mask.flatten()
        kw = dict(old_logp=old, advantages=adv, mask=m, temperature=0.8, entropy_coef=0.01)
        total = m.sum()
        # Two micro-batches with the global token count give the gradient of the whole batch.
        for rows in (slice(0, 130), slice(130, 300)):
            loss, _ = fused_grpo_loss(hidden[rows], weight, targets[rows], scale=1.0 / total,
                                      **{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
            loss.backward()
        ref_loss, _, h64, w64 = _grpo_ref64(hidden, weight, targets, old, None, adv, mask, agg="token-mean",
                                            kl_kind="k3", kl_coef=0.0, ent_coef=0.01, clip_c=3.0)
        ref_loss.backward()
        _close(hidden.grad, h64.grad, torch.float32, what="d_hidden")
        _close(weight.grad, w64.grad, torch.float32, what="d_weight")
        # Frozen LM head (LoRA): only d_hidden; under no_grad: the same loss, no graph.
        hidden.grad = None
        loss, _ = fused_grpo_loss(hidden, weight.detach(), targets, **kw)
        loss.backward()
        _close(hidden.grad, h64.grad, torch.float32, what="d_hidden, frozen weight")
        with torch.no_grad():
            again, _ = fused_grpo_loss(hidden, weight, targets, **kw)
        assert not again.requires_grad
        torch.testing.assert_close(again, loss.detach(), rtol=1e-6, atol=1e-7)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(clip_c=1.0), "clip_c"),
        (dict(kl_kind="full"), "unknown kl_kind"),
        (dict(kl_coef=0.1), "needs ref_logp"),
        (dict(advantages=torch.zeros(5)), "advantages must have shape"),
        (dict(scale=torch.ones(3)), "scale must have shape"),
    ])
    def test_fused_grpo_loss_errors(kwargs, match):
        args = dict(old_logp=torch.zeros(4), advantages=torch.zeros(4), mask=torch.ones(4))
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            fused_grpo_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), **args)

    def test_token_weights_reproduce_agg_loss():
        g = torch.Generator().manual_seed(3)
        loss = torch.randn(4, 6, generator=g, dtype=torch.float64)
        mask = torch.rand(4, 6, generator=g) > 0.4
        for agg in grpo_kernels.grpo_loss.AGG_MODES:
            for norm in (dict(), dict(num_tokens=17, num_seqs=9, max_len=11)):
                w = token_weights(mask, agg, **norm)
                torch.testing.assert_close((loss * mask * w).sum(), agg_loss(loss, mask, agg, **norm), msg=agg)

    def _advantage64(r, n, eps, norm_by_std, leave_one_out):
        out = []
        for grp in r.double().view(-1, n).tolist():
            mean = sum(grp) / n if n > 1 else 0.0
            std = (sum((x - mean) ** 2 for x in grp) / (n - 1)) ** 0.5 if n > 1 else 1.0
            for x in grp:
                base = (sum(grp) - x) / (n - 1) if leave_one_out and n > 1 else mean
                out.append((x - base) / (std + eps) if norm_by_std else x - base)
        return torch.tensor(out, dtype=torch.float64)

    @pytest.mark.parametrize("n", [1, 2, 5, 16, 33])
    @pytest.mark.parametrize("norm_by_std,leave_one_out", [(True, False), (False, False), (False, True)])
    def test_group_advantage_matches_float64(n, norm_by_std, leave_one_out):
        r = torch.randn(7 * n, generator=torch.Generator().manual_seed(n)) * 3
        adv = group_advantage(r, n, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
        assert adv.dtype == torch.float32 and adv.shape == r.shape
        want = _advantage64(r, n, 1e-6, norm_by_std, leave_one_out)
        torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)
        ref = group_advantage_ref(r, n, norm_by_std=norm_by_std, leave_one_out=leave_one_out)
        torch.testing.assert_close(adv, ref, rtol=1e-6, atol=1e-6)

    def test_group_advantage_constant_groups_integer_rewards_and_errors():
        r = torch.tensor([0.1] * 5 + [0.7, 0.7, 0.7, 0.7, 0.7] + [1.0, 0.0, 0.0, 0.0, 0.0])
        for loo in (False, True):
            adv = group_advantage(r, 5, norm_by_std=not loo, leave_one_out=loo)
            assert torch.equal(adv[:10], torch.zeros(10)), adv[:10]
        ints = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.int64)
        torch.testing.assert_close(group_advantage(ints, 3), group_advantage_ref(ints, 3))
        torch.testing.assert_close(group_advantage(ints.double(), 2, eps=0.1), group_advantage_ref(ints, 2, eps=0.1))
        assert group_advantage(torch.zeros(0), 4).shape == (0,)
        with pytest.raises(ValueError, match="norm_by_std=False"):  # RLOO over the std: refused, as the reference
            group_advantage(r, 5, leave_one_out=True)
        for rewards, size in ((torch.zeros(2, 3), 3), (torch.zeros(6), 0), (torch.zeros(7), 3), (torch.zeros(6), 2.0)):
            with pytest.raises(ValueError):
                group_advantage(rewards, size)
