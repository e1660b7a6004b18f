"""The bf16 AdamW of full_precision bf16 (tasks/engine/bf16_adamw.py): unbiased stochastic rounding, updates
that fp32 AdamW makes and plain bf16 AdamW loses, and a state that checkpoints resume."""
import copy

import pytest
import torch

from tasks.engine.bf16_adamw import Bf16AdamW, round_stochastically


def test_stochastic_rounding_lands_on_a_neighbour_with_the_right_odds():
    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 1 / 1024)  # 1/8 of the way from bf16 1.0 to the next value, 1.0078125
    rounded = round_stochastically(x).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0078125}
    assert (rounded == 1.0078125).float().mean().item() == pytest.approx(1 / 8, abs=0.005)
    negative = round_stochastically(-x).float()
    assert negative.mean().item() == pytest.approx(-(1 + 1 / 1024), abs=2e-5)  # unbiased either side of zero
    exact = torch.tensor([0.0, 1.0, -2.5, 3.0e-8]).bfloat16().float()
    assert torch.equal(round_stochastically(exact).float(), exact)  # a bf16 value stays itself


def adamw_pair(lr, weight_decay, values):
    fp32 = torch.nn.Parameter(values.clone())
    bf16 = torch.nn.Parameter(values.clone().bfloat16())
    return (fp32, torch.optim.AdamW([fp32], lr=lr, weight_decay=weight_decay)), \
        (bf16, Bf16AdamW([bf16], lr=lr, weight_decay=weight_decay))


def test_small_updates_add_up_as_in_fp32_where_plain_bf16_loses_them():
    """lr 1e-4 on weights of 1.0: each step moves a weight by ~1e-4, a 40th of a bf16 step. fp32 AdamW
    drifts; plain bf16 AdamW (round to nearest) never moves; Bf16AdamW drifts as fp32 does, on average."""
    torch.manual_seed(0)
    (fp32, fp32_adamw), (ours, ours_adamw) = adamw_pair(1e-4, 0.01, torch.ones(100_000))
    plain = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    plain_adamw = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.01)
    for _ in range(40):
        gradient = torch.randn(()) * 0.01 + 0.02
        for weight, optimizer in ((fp32, fp32_adamw), (ours, ours_adamw), (plain, plain_adamw)):
            weight.grad = torch.full_like(weight, gradient.item())
            optimizer.step()
    drift = 1 - fp32.mean().item()
    assert drift > 2e-3
    assert torch.equal(plain, torch.ones_like(plain))
    assert 1 - ours.float().mean().item() == pytest.approx(drift, rel=0.02)


def test_one_step_is_fp32_adamw_rounded_to_a_neighbour():
    """From the same bf16 start, every weight after one step is one of the two bf16 values around fp32
    AdamW's result, with ordinary gradients of mixed signs and sizes."""
    torch.manual_seed(1)
    start = torch.randn(4096).bfloat16().float()
    (fp32, fp32_adamw), (ours, ours_adamw) = adamw_pair(1e-2, 0.1, start)
    gradient = torch.randn(4096)
    fp32.grad, ours.grad = gradient.clone(), gradient.clone().bfloat16()
    fp32_adamw.step()
    ours_adamw.step()
    below = fp32.detach().bfloat16().float()  # round to nearest: one neighbour
    other = torch.nextafter(below.bfloat16(), torch.where(fp32 > below, torch.inf, -torch.inf).bfloat16()).float()
    got = ours.detach().float()
    assert torch.all((got == below) | (got == other))


def test_state_saves_and_resumes_to_the_same_update():
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(64, 64).bfloat16())
    optimizer = Bf16AdamW([weight], lr=1e-3)
    for _ in range(3):
        weight.grad = torch.randn_like(weight)
        optimizer.step()
    saved, state = weight.detach().clone(), copy.deepcopy(optimizer.state_dict())  # as through a checkpoint file
    twin = torch.nn.Parameter(saved.clone())
    resumed = Bf16AdamW([twin], lr=1e-3)
    resumed.load_state_dict(state)
    assert resumed.state[twin]["exp_avg"].dtype == torch.bfloat16 and resumed.state[twin]["step"].item() == 3
    gradient = torch.randn_like(weight)
    for w, o in ((weight, optimizer), (twin, resumed)):
        w.grad = gradient.clone()
        torch.manual_seed(3)  # the same rounding draws
        o.step()
    assert torch.equal(weight, twin)


def test_fp32_parameters_are_refused():
    with pytest.raises(TypeError, match=r"Bf16AdamW trains bf16 parameters; got torch.float32 \(a \(3,\) tensor\)"):
        Bf16AdamW([torch.nn.Parameter(torch.zeros(3))])
