"Learning-rate schedules: upstream's rule bit for bit, the intended ones, edges and errors."
import math
import pytest
import torch
from radiodiff_vae.core import ConfigError
from radiodiff_vae.schedules import SCHEDULES, lr_at, lr_multiplier, make_lr_lambda

T, LR0, MIN_LR = 150_000, 5e-6, 5e-7


def upstream_lambda(it, T=T, min_lr=MIN_LR):
    "Verbatim from RadioDiff's train_vae.py."
    return max((1 - it / T) ** 0.95, min_lr)


@pytest.mark.parametrize("step", [0, 1, 2, 99, 35_000, T // 2, 123_457, T - 2, T - 1, T])
def test_radiodiff_bit_for_bit(step):
    assert lr_multiplier("radiodiff", step, T, base_lr=LR0, min_lr=MIN_LR) == upstream_lambda(step)
    assert lr_at("radiodiff", step, T, base_lr=LR0, min_lr=MIN_LR) == LR0 * upstream_lambda(step)


def test_radiodiff_bit_for_bit_small_runs():
    for total in (1, 7, 1000, 149_999):
        for step in range(0, total + 1, max(1, total // 97)):
            assert lr_multiplier("radiodiff", step, total, base_lr=1.0, min_lr=1e-3) == upstream_lambda(step, total, 1e-3)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_past_the_end_is_finite_real(kind):
    for step in (T + 1, T + 17, 3 * T, 10**9):
        lr = lr_at(kind, step, T, base_lr=LR0, min_lr=MIN_LR)
        assert isinstance(lr, float) and math.isfinite(lr) and lr > 0
    with pytest.raises(TypeError):  # what upstream does past T
        upstream_lambda(T + 1)


def test_first_middle_last_values():
    assert lr_at("radiodiff", 0, T, base_lr=LR0) == LR0
    assert lr_at("radiodiff", T // 2, T, base_lr=LR0) == LR0 * 0.5 ** 0.95
    assert lr_at("radiodiff", T, T, base_lr=LR0, min_lr=MIN_LR) == LR0 * MIN_LR
    assert lr_at("radiodiff", T + 5, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx(2.5e-12, rel=1e-12)
    assert lr_at("poly", 0, T, base_lr=LR0, min_lr=MIN_LR) == LR0
    assert lr_at("poly", T // 2, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx(LR0 * 0.5 ** 0.95, rel=1e-12)
    assert lr_at("poly", T - 1, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at("cosine", 0, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx(LR0, rel=1e-12)
    assert lr_at("cosine", T // 2, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx((LR0 + MIN_LR) / 2, rel=1e-12)
    assert lr_at("cosine", T, T, base_lr=LR0, min_lr=MIN_LR) == pytest.approx(MIN_LR, rel=1e-12)
    assert lr_at("constant", T // 2, T, base_lr=LR0) == LR0


def test_cosine_warmup_is_linear_and_monotone():
    W = 100
    lrs = [lr_at("cosine", s, 1000, base_lr=1e-3, min_lr=1e-5, warmup_steps=W) for s in range(0, 1001)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[W] == pytest.approx(1e-3)
    assert lrs[W // 2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert all(a < b for a, b in zip(lrs[:W], lrs[1:W + 1]))
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1:]))


def test_poly_cosine_wsd_never_below_floor():
    for kind in ("poly", "cosine", "wsd"):
        lrs = [lr_at(kind, s, 500, base_lr=1e-3, min_lr=2e-4) for s in range(0, 700)]
        assert min(lrs) == pytest.approx(2e-4) and max(lrs) == pytest.approx(1e-3)


def test_errors():
    with pytest.raises(ConfigError, match="valid schedules: radiodiff, poly, cosine, constant, wsd"):
        lr_at("linear", 0, T, base_lr=LR0)
    with pytest.raises(ConfigError, match="total_steps"):
        lr_at("poly", 0, 0, base_lr=LR0)
    with pytest.raises(ConfigError, match="min_lr"):
        lr_at("cosine", 0, T, base_lr=1e-7, min_lr=5e-7)
    with pytest.raises(ConfigError, match="warmup_steps"):
        lr_at("cosine", 0, 10, base_lr=1e-3, warmup_steps=10)
    with pytest.raises(ConfigError):
        make_lr_lambda("foo", 10, 1e-3)


def test_wsd_warms_up_holds_then_falls_linearly():
    W, T_, D = 60, 1200, 240          # decay_fraction 0.2 of 1200 steps
    lrs = [lr_at("wsd", s, T_, base_lr=1e-3, min_lr=1e-5, warmup_steps=W, decay_fraction=0.2) for s in range(T_ + 50)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[W // 2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert all(a < b for a, b in zip(lrs[:W], lrs[1:W + 1]))
    assert set(lrs[W:T_ - D + 1]) == {1e-3}                                       # held at the peak
    steps = [lrs[s] - lrs[s + 1] for s in range(T_ - D, T_)]
    assert steps == pytest.approx([(1e-3 - 1e-5) / D] * D, rel=1e-9)              # a straight line down
    assert lrs[T_:] == pytest.approx([1e-5] * 50)
    with pytest.raises(ConfigError, match="decay_fraction"):
        lr_at("wsd", 0, T_, base_lr=1e-3, warmup_steps=1000, decay_fraction=0.2)  # 1000 + 240 > 1200


@pytest.mark.parametrize("kind", SCHEDULES)
def test_lambdalr_matches_lr_at(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(kind, 20, 1e-3, min_lr=1e-5, warmup_steps=0))
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(kind, step, 20, base_lr=1e-3, min_lr=1e-5), rel=1e-12)
        opt.step(); sched.step()


def test_log_format_hides_the_lr():
    assert f"{lr_at('radiodiff', 0, T, base_lr=LR0):.5f}" == "0.00001"
    assert all(f"{lr_at('radiodiff', s, T, base_lr=LR0):.5f}" == "0.00000" for s in range(1, T + 10, 997))
