"""The learning rate of each step (OptimizerConfig.lr with its step decay)."""

from __future__ import annotations


def scheduled_lr(optimizer, completed_steps: int) -> float:
    """The learning rate of the step after `completed_steps`: optimizer.lr times lr_decay_factor once
    for every step in lr_decay_steps that has been completed."""
    passed = sum(1 for step in optimizer.lr_decay_steps if step <= completed_steps)
    return float(optimizer.lr) * float(optimizer.lr_decay_factor) ** passed
