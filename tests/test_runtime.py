import pytest

from fromfeedback.files import UserError
from fromfeedback.runtime import batch_plan, check_lr_schedule, check_precision, learning_rate


def test_check_lr_schedule_accepts_the_schedules_learning_rate_knows():
    for schedule in ("cosine", "linear", "constant"):
        check_lr_schedule(schedule)
    with pytest.raises(UserError, match=r"lr_schedule must be cosine, linear or constant, got 'step'"):
        check_lr_schedule("step")


def test_learning_rate_schedule_by_hand():
    assert [learning_rate(s, 12, 1.0, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert learning_rate(2, 12, 1.0, 2, "cosine") == 1.0
    assert abs(learning_rate(7, 12, 1.0, 2, "cosine") - 0.55) < 1e-9  # halfway through the decay: 0.1 + 0.9 * 0.5
    assert abs(learning_rate(7, 12, 1.0, 2, "linear") - 0.55) < 1e-9
    assert learning_rate(3, 10, 1.0, 0, "constant") == 1.0


def test_batch_plan_is_seeded_and_covers_each_epoch():
    plan = batch_plan(10, 3, epochs=2, max_steps=0, seed=1)
    assert len(plan) == 6 and all(len(b) == 3 for b in plan)
    assert len(set(sum(plan[:3], []))) == 9
    assert plan == batch_plan(10, 3, epochs=2, max_steps=0, seed=1) != batch_plan(10, 3, epochs=2, max_steps=0, seed=2)
    assert len(batch_plan(10, 3, epochs=1, max_steps=7, seed=1)) == 7


def test_check_precision_names_what_to_fix():
    for precision in ("auto", "bf16", "fp32"):
        check_precision(precision)
    with pytest.raises(UserError, match=r"--precision must be auto, bf16 or fp32, got 'fp16'"):
        check_precision("fp16", "--precision")
