"""Fault injection for the reliability tests, driven by the environment (never set in real runs):

    MEGALONG_FAULT_NAN_LOSS=3,4   the loss of these iterations (0-based) reads as NaN on every rank
"""

import os


def _iterations(variable: str) -> set[int]:
    value = os.environ.get(variable, "")
    return {int(item) for item in value.split(",") if item.strip()}


def corrupt_loss(iteration: int, loss: float) -> float:
    return float("nan") if iteration in _iterations("MEGALONG_FAULT_NAN_LOSS") else loss
