"""Learning-rate schedules: the learning rate of optimizer step `step` as a pure function.

`step` counts from 1, like the `step` column of metrics.csv, and `total_steps` is the run's
number of optimizer steps. With W = warmup_steps and base = the optimizer's lr:

- Warm-up (Goyal et al. 2017, linear): for step <= W, lr = base * step / W, so the first step
  uses base / W and step W uses base.
- After warm-up, s = step - W - 1 counts the post-warm-up steps from 0, so the first step after
  warm-up starts the schedule at base:
  - constant: lr = base.
  - step: lr = base * gamma ** floor(s / every), that is `every` steps at base, then
    `every` steps at base * gamma, and so on.
  - cosine (Loshchilov & Hutter 2017, no restarts): with T = max(1, total_steps - W - 1),
    lr = min_lr + (base - min_lr) * (1 + cos(pi * min(s, T) / T)) / 2,
    which is base at the first post-warm-up step and exactly min_lr at step total_steps.
    Steps past total_steps (a resumed run asked for more) stay at min_lr.

`schedule=None` is the constant learning rate with no warm-up. The schedule object only needs
the attributes of `distbp.data.job.ScheduleCfg`: name, warmup_steps, gamma, every, min_lr.
"""

from __future__ import annotations

import math


def _constant(base_lr, s, schedule, total_steps):
    return float(base_lr)


def _step(base_lr, s, schedule, total_steps):
    if not schedule.every:
        raise ValueError("the step schedule needs `every` >= 1")
    return base_lr * schedule.gamma ** (s // schedule.every)


def _cosine(base_lr, s, schedule, total_steps):
    if total_steps is None:
        raise ValueError("the cosine schedule needs total_steps")
    span = max(1, total_steps - schedule.warmup_steps - 1)
    progress = min(s, span) / span  # 0 at the first post-warm-up step, 1 at the last step
    return schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# name -> lr(base_lr, s = post-warm-up steps taken before this one, schedule, total_steps)
SCHEDULES = {"constant": _constant, "step": _step, "cosine": _cosine}


def learning_rate(step: int, base_lr: float, schedule, total_steps: int | None = None) -> float:
    """The learning rate applied at optimizer step `step` (1-based); never negative. Rounded
    to 15 significant digits, below the rounding error of the formulas themselves, so that
    the rate applied and logged is 0.00015 for 0.003 * 1 / 20, not 0.00015000000000000001."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if schedule is None:
        return float(base_lr)
    warmup = schedule.warmup_steps
    if step <= warmup:
        return _round(base_lr * step / warmup)
    if schedule.name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule.name!r}; expected one of {', '.join(SCHEDULES)}")
    return _round(SCHEDULES[schedule.name](base_lr, step - warmup - 1, schedule, total_steps))


def _round(lr):
    return float(f"{lr:.15g}")
