"""The order of rows: seeded per epoch, optionally grouped by length, and the same after a resume."""

from __future__ import annotations

import random

import pytest

from tests.helpers import cpu_device
from tunesmith.data.order import STEPS_PER_MEGABATCH, BatchOrder
from tunesmith.errors import ConfigError
from tunesmith.steps import DatasetSteps, StepPlan
from tunesmith.strategy import SingleDeviceStrategy

_rng = random.Random(0)
#: many short rows, some long ones, like chat data
LENGTHS = [_rng.randint(5, 60) if _rng.random() < 0.7 else _rng.randint(300, 512) for _ in range(203)]


def epoch_steps(order: BatchOrder, epoch: int) -> list[list[int]]:
    steps, position = [], (epoch, 0)
    while position[0] == epoch:
        steps.append(order.step_rows(*position))
        position = order.advance(*position)
    return steps


def padding(steps: list[list[int]], batch_size: int) -> int:
    """Padding tokens when each step's rows are cut into micro-batches padded to their longest row."""
    total = 0
    for step in steps:
        for start in range(0, len(step), batch_size):
            lengths = [LENGTHS[row] for row in step[start : start + batch_size]]
            total += max(lengths) * len(lengths) - sum(lengths)
    return total


def test_grouping_by_length_visits_every_row_once_with_far_less_padding():
    plain = epoch_steps(BatchOrder(len(LENGTHS), 8, seed=3), 0)
    grouped = epoch_steps(BatchOrder(len(LENGTHS), 8, seed=3, lengths=LENGTHS), 0)
    assert sorted(row for step in grouped for row in step) == list(range(len(LENGTHS)))
    assert [len(step) for step in grouped] == [len(step) for step in plain]  # whole steps, the partial one last
    assert padding(grouped, 4) < padding(plain, 4) / 4


def test_grouped_steps_come_in_a_seeded_order_that_changes_with_the_epoch():
    order = BatchOrder(len(LENGTHS), 4, seed=3, lengths=LENGTHS)
    again = BatchOrder(len(LENGTHS), 4, seed=3, lengths=LENGTHS)
    assert epoch_steps(order, 1) == epoch_steps(again, 1)
    assert epoch_steps(order, 0) != epoch_steps(order, 1)
    longest = [max(LENGTHS[row] for row in step) for step in epoch_steps(order, 0)[:STEPS_PER_MEGABATCH]]
    assert longest != sorted(longest, reverse=True)  # long and short steps are shuffled, not sorted


def test_a_resumed_source_continues_with_the_same_rows_and_refuses_a_changed_grouping():
    rows = [["x" * length] for length in LENGTHS]  # a unit's len() is its length in tokens
    strategy = SingleDeviceStrategy(cpu_device(), "fp32")
    plan = StepPlan(global_batch=4, batch_size=2, seed=5, group_by_length=True)
    whole = DatasetSteps(rows, plan, strategy)
    for _ in range(7):
        whole.next_step(None)
    resumed = DatasetSteps(rows, plan, strategy)
    resumed.load_state_dict(whole.state_dict())
    assert resumed.next_step(None).pieces == whole.next_step(None).pieces
    ungrouped = DatasetSteps(rows, StepPlan(global_batch=4, batch_size=2, seed=5), strategy)
    with pytest.raises(ConfigError, match="--group-by-length"):
        ungrouped.load_state_dict(whole.state_dict())
