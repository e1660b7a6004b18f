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


def assert_bf16_neighbours(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Every value of bf16 `got` is one of the two bf16 values around fp32 `expected` (an exact one: itself).
    Values a million times below the largest are left out: there a moment is the difference of two nearly
    equal terms, and torch's fp32 arithmetic (lerp) and ours round that difference differently."""
    expected = expected.detach().float().cpu()
    nearest = expected.bfloat16().float()
    other = torch.nextafter(nearest.bfloat16(), torch.where(expected > nearest, torch.inf, -torch.inf).bfloat16())
    got = got.detach().float().cpu()
    significant = expected.abs() > 1e-6 * expected.abs().max()
    assert significant.float().mean() > 0.99
    assert torch.all(((got == nearest) | (got == other.float()))[significant])


def test_steps_are_fp32_adamw_rounded_to_a_neighbour():
    """From the same bf16 start and state, every weight and both moments after a step are one of the two
    bf16 values around fp32 AdamW's, with ordinary gradients of mixed signs and sizes, at steps 1 to 3."""
    torch.manual_seed(1)
    (fp32, fp32_adamw), (ours, ours_adamw) = adamw_pair(1e-2, 0.1, torch.randn(4096).bfloat16().float())
    for _ in range(3):
        gradient = torch.randn(4096).bfloat16().float()
        fp32.grad, ours.grad = gradient.clone(), gradient.clone().bfloat16()
        fp32_adamw.step()
        ours_adamw.step()
        reference = fp32_adamw.state[fp32]
        for got, expected in ((ours, fp32), (ours_adamw.state[ours]["exp_avg"], reference["exp_avg"]),
                              (ours_adamw.state[ours]["exp_avg_sq"], reference["exp_avg_sq"])):
            assert_bf16_neighbours(got, expected)
        with torch.no_grad():  # the next step from the same (rounded) start on both sides
            fp32.copy_(ours.float())
            reference["exp_avg"].copy_(ours_adamw.state[ours]["exp_avg"].float())
            reference["exp_avg_sq"].copy_(ours_adamw.state[ours]["exp_avg_sq"].float())


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


def test_fp32_parameters_beside_bf16_ones_get_plain_fp32_adamw():
    """A family may keep some modules in fp32 beside bf16 weights: those train as torch's AdamW trains them."""
    torch.manual_seed(4)
    values = torch.randn(256)
    (fp32, fp32_adamw), _ = adamw_pair(1e-2, 0.1, values)
    kept = torch.nn.Parameter(values.clone())
    ours_adamw = Bf16AdamW([kept, torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        gradient = torch.randn(256)
        fp32.grad, kept.grad = gradient.clone(), gradient.clone()
        fp32_adamw.step()
        ours_adamw.step()
    torch.testing.assert_close(kept, fp32, rtol=1e-6, atol=1e-7)


def test_other_dtypes_are_refused():
    with pytest.raises(TypeError, match=r"trains bf16 \(and fp32\) parameters; got torch.float16 \(a \(3,\) tensor\)"):
        Bf16AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
