"""The learning-rate schedule, and fitting a training run into a time budget.

Warmup then cosine: the rate climbs linearly for `warmup_steps`, then follows half a cosine down to
`min_lr_ratio` of its peak at the last planned step. A cosine needs its length T up front; when a run
is given a time budget instead of a step count, the loop measures its first steps and asks
`plan_steps` for the T whose steps, validations and checkpoints fit in the time that is left.
"""

from __future__ import annotations

import math
import time

EVALS_PER_RUN = 10  # validation points when eval_interval is left to the loop


def lr_at(step: int, cfg, planned: int | None) -> float:
    """Learning rate for the update that follows `step` completed steps: warmup, then cosine.
    cfg: the run's TrainConfig (its lr, warmup_steps and min_lr_ratio)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if planned is None:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, planned - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_steps(cfg, step, step_seconds, eval_seconds, save_seconds, remaining) -> int:
    """T such that the remaining steps, their validations and checkpoints fit in the budget."""
    if cfg.eval_interval:
        per_step = step_seconds + (eval_seconds + save_seconds) / cfg.eval_interval
        remaining_steps = 0.93 * (remaining - eval_seconds - save_seconds) / per_step
    else:
        remaining_steps = (
            0.93 * (remaining - (EVALS_PER_RUN + 1) * (eval_seconds + save_seconds)) / step_seconds
        )
    return max(step + 1, 2 * cfg.warmup_steps, step + int(remaining_steps))


def time_left(state, step, train_time, train_tokens, tokens_per_step, budget_end) -> str:
    left = None
    if state["planned_steps"] and train_tokens:
        left = (state["planned_steps"] - step) * train_time / (train_tokens / tokens_per_step)
    if budget_end is not None:
        b = max(0.0, budget_end - time.monotonic())
        left = b if left is None else min(left, b)
    if left is None:
        return "?"
    m, s = divmod(int(left), 60)
    return f"{m}:{s:02d}"
