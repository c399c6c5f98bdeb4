"""Tests for distbp.backprop.schedule against the closed forms, worked out by hand (base lr 0.1)."""

import subprocess
import sys

import pytest

from distbp.data.job import ScheduleCfg, job_from_dict
from distbp.backprop.schedule import learning_rate

BASE = 0.1


def lrs(schedule, steps, total=None):
    return [learning_rate(s, BASE, schedule, total) for s in steps]


def test_no_schedule_is_constant():
    assert lrs(None, [1, 2, 500, 10**6], total=500) == [BASE] * 4


def test_constant_with_warmup():
    sched = ScheduleCfg(name="constant", warmup_steps=4)
    assert lrs(sched, [1, 2, 3, 4, 5, 6, 100], total=100) == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rel=1e-12)


def test_constant_without_warmup_starts_at_base():
    assert lrs(ScheduleCfg(name="constant"), [1, 50], total=50) == [BASE, BASE]


def test_step_decay():
    sched = ScheduleCfg(name="step", gamma=0.5, every=3)
    steps = [1, 2, 3, 4, 5, 6, 7, 10, 30]
    assert lrs(sched, steps, total=30) == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.0125, 0.1 * 0.5**9], rel=1e-12)


def test_step_decay_after_warmup():
    sched = ScheduleCfg(name="step", warmup_steps=2, gamma=0.5, every=3)
    # warm-up 0.05, 0.1; then s = 0, 1, 2 at 0.1; s = 3..5 at 0.05; s = 6 at 0.025
    assert lrs(sched, [1, 2, 3, 4, 5, 6, 8, 9], total=9) == pytest.approx(
        [0.05, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025], rel=1e-12)


def test_cosine():
    sched = ScheduleCfg(name="cosine")
    # total 5, span 4: progress 0, 1/4, 1/2, 3/4, 1; 0.05 * (1 + cos(pi/4)) = 0.0853553390593...
    assert lrs(sched, [1, 2, 3, 4, 5], total=5) == pytest.approx(
        [0.1, 0.08535533905932738, 0.05, 0.014644660940672627, 0.0], rel=1e-12, abs=1e-15)


def test_cosine_after_warmup_ends_at_min_lr():
    sched = ScheduleCfg(name="cosine", warmup_steps=2, min_lr=0.01)
    # warm-up 0.05, 0.1; then span 7 - 2 - 1 = 4: 0.01 + 0.09 * (1 + cos(pi * k / 4)) / 2
    expected = [0.05, 0.1, 0.1, 0.08681980515339464, 0.055, 0.023180194846605363, 0.01]
    assert lrs(sched, range(1, 8), total=7) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(7, BASE, sched, 7) == 0.01  # exactly the floor at the last step


def test_cosine_past_the_last_step_stays_at_the_floor():
    sched = ScheduleCfg(name="cosine", min_lr=0.001)
    assert lrs(sched, [10, 11, 15, 19, 100], total=10) == [0.001] * 5


def test_cosine_with_a_single_step_after_warmup():
    assert lrs(ScheduleCfg(name="cosine"), [1], total=1) == [BASE]
    assert lrs(ScheduleCfg(name="cosine", warmup_steps=3), [1, 3, 4], total=4) == pytest.approx(
        [BASE / 3, BASE, BASE], rel=1e-12)


@pytest.mark.parametrize("name", ["constant", "step", "cosine"])
def test_the_first_step_of_a_warmup_is_base_over_warmup(name):
    sched = ScheduleCfg(name=name, warmup_steps=10, every=5)
    assert learning_rate(1, BASE, sched, 100) == pytest.approx(0.01, rel=1e-12)
    assert learning_rate(10, BASE, sched, 100) == pytest.approx(0.1, rel=1e-12)
    assert learning_rate(11, BASE, sched, 100) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("sched", [
    None,
    ScheduleCfg(name="constant", warmup_steps=7),
    ScheduleCfg(name="step", warmup_steps=3, gamma=0.1, every=2),
    ScheduleCfg(name="cosine"),
    ScheduleCfg(name="cosine", warmup_steps=5, min_lr=0.0),
    ScheduleCfg(name="cosine", warmup_steps=5, min_lr=1e-4),
])
def test_never_negative_and_never_above_base(sched):
    total = 50
    values = lrs(sched, range(1, 2 * total), total=total)
    assert all(0.0 <= v <= BASE * (1 + 1e-12) for v in values)
    if sched is not None and sched.name != "constant":  # decays after warm-up, never rises
        after = values[sched.warmup_steps:]
        assert all(b <= a for a, b in zip(after, after[1:]))
        assert after[-1] < after[0]


def test_schedule_from_a_job_file():
    job = job_from_dict({
        "data": {"path": "x.parquet"}, "model": {"layers": [2, 3]},
        "train": {"steps": 20, "optimizer": {"lr": 0.2},
                  "schedule": {"name": "step", "warmup_steps": 2, "gamma": "0.5", "every": 5}},
    })
    sched, lr = job.train.schedule, job.train.optimizer.lr
    got = [learning_rate(s, lr, sched, job.train.steps) for s in (1, 2, 7, 8, 20)]
    assert got == pytest.approx([0.1, 0.2, 0.2, 0.1, 0.025], rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError):
        learning_rate(0, BASE, None, 10)
    with pytest.raises(ValueError):
        learning_rate(5, BASE, ScheduleCfg(name="cosine"), None)
    with pytest.raises(ValueError):
        learning_rate(5, BASE, ScheduleCfg(name="step"), 10)  # every is required


def test_imports_no_ray_numpy_or_click():
    code = ("import sys, distbp.backprop.schedule; "
            "print([m for m in ('ray', 'click', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_warm_up_rates_are_the_decimal_a_user_expects():
    sched = ScheduleCfg(name="cosine", warmup_steps=20)
    got = [repr(learning_rate(s, 0.003, sched, 920)) for s in (1, 2, 3, 4, 7)]
    assert got == ["0.00015", "0.0003", "0.00045", "0.0006", "0.00105"]
