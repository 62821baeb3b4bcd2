"""verl parity of the optimizer settings, the warmup, RLOO and the Dr.GRPO aggregation, against values computed by
hand from verl's formulas (verl-project/verl 1dda039b: `get_constant_schedule_with_warmup`,
`compute_rloo_outcome_advantage`, `agg_loss`; `optim.weight_decay` 0.01)."""

import pytest
import torch

import grpo_kernels
from grpo.loss import agg_loss
from grpo.schedule import build_scheduler, warmup_lr_scale
from grpo_kernels import group_advantage_ref
from hpc.presets import PRESETS
from hpc.submit import main


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_use_verls_weight_decay(name):
    assert PRESETS[name]().train.weight_decay == 0.01


def test_warmup_is_s_over_w_from_zero():
    # verl: lr_lambda(s) = s / max(1, w) for s < w, else 1 (the first warmup step runs at lr 0)
    assert [warmup_lr_scale(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [warmup_lr_scale(s, 0) for s in range(3)] == [1.0, 1.0, 1.0]


def test_scheduler_lr_per_training_step():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.3, weight_decay=0.01)
    sched = build_scheduler(opt, 3)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])


def test_rloo_is_leave_one_out_without_the_std():
    # verl's rloo: A_i = r_i * n/(n-1) - mean * n/(n-1) = r_i - mean of the others
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.5])
    adv = group_advantage_ref(rewards, 4, norm_by_std=False, leave_one_out=True)
    want = [2 / 3, -2 / 3, -2 / 3, 2 / 3, -2 / 3, -2 / 3, -2 / 3, 2.0]
    assert adv.tolist() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("fn", [group_advantage_ref, grpo_kernels.group_advantage], ids=["torch", "triton"])
def test_rloo_divided_by_std_is_refused(fn):
    if fn is not group_advantage_ref and not grpo_kernels.triton_available(torch.device("cpu")):
        pytest.skip("no Triton interpreter here")
    with pytest.raises(ValueError, match="norm_by_std=False"):
        fn(torch.zeros(8), 4, leave_one_out=True)


def test_rloo_with_std_refused_on_the_login_node(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["--preset", "local", "--set", f"out_dir={out}", "--set", "algo.leave_one_out=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algo.norm_adv_by_std=false" in err[0], err
    assert not out.exists()


def test_seq_mean_token_sum_norm_as_verl():
    # verl: sum over sequences of the token sums / global_batch_size * dp / loss_scale_factor (the padded response
    # length, `max_response_length`); our loop multiplies each rank's loss by dp after agg_loss
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # one rank, 2 sequences, horizon 3: (1 + 2 + 4) / 2 / 3
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    # this rank's half of 4 sequences on 2 ranks, horizon 8 (max_new_tokens): (7 / 4 * 2) / 8 after the dp factor
    got = agg_loss(loss, mask, "seq-mean-token-sum-norm", num_seqs=4, max_len=8) * 2
    assert got.item() == pytest.approx(7 / 4 * 2 / 8)
    w = grpo_kernels.token_weights(mask, "seq-mean-token-sum-norm", num_seqs=4, max_len=8)
    assert (loss * mask * w).sum().item() * 2 == pytest.approx(7 / 4 * 2 / 8)
