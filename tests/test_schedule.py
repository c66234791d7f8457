import math

import pytest

from emoshield.errors import EmoshieldError
from emoshield.training import lr_schedule, reference_lr_schedule


def test_reference_schedule_matches_hand_computed_table():
    # epochs=50: decay_start=25; k=26..29 -> frac 0 (x1); k=30..34 -> frac 1 (x0.9 each epoch);
    # k=35..39 -> frac 2 (x0.81 each); k=40..44 -> frac 3 (x0.729); k=45..49 -> x0.6561; k=50 -> x0.59049
    rates = reference_lr_schedule(epochs=50, lr0=0.01, decay_rate=0.9, decay_stride=5)
    assert len(rates) == 50
    assert rates[:29] == [0.01] * 29
    expected = {
        30: 0.009, 31: 0.0081, 32: 0.00729, 33: 0.006561, 34: 0.0059049,
        35: 0.0059049 * 0.81, 36: 0.0059049 * 0.81 ** 2, 39: 0.0059049 * 0.81 ** 5,
        40: 0.0059049 * 0.81 ** 5 * 0.729, 44: 0.0059049 * 0.81 ** 5 * 0.729 ** 5,
        45: 0.0059049 * 0.81 ** 5 * 0.729 ** 5 * 0.6561,
        50: 0.0059049 * 0.81 ** 5 * 0.729 ** 5 * 0.6561 ** 5 * 0.59049,
    }
    for epoch, value in expected.items():
        assert math.isclose(rates[epoch - 1], value, rel_tol=1e-9), epoch


def test_reference_schedule_small_run_and_odd_epochs():
    # epochs=15: decay_start=7.5; k=8..12 -> floor((k-7.5)/5)=0; k=13..15 -> 1
    rates = reference_lr_schedule(epochs=15, lr0=0.1)
    assert rates[:12] == [0.1] * 12
    assert rates[12:] == pytest.approx([0.09, 0.081, 0.0729])


def test_other_schedules_and_errors():
    assert lr_schedule("constant", 3, 0.5) == [0.5, 0.5, 0.5]
    cosine = lr_schedule("cosine", 4, 1.0)
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:]))
    with pytest.raises(EmoshieldError):
        lr_schedule("nope", 3, 0.1)
    with pytest.raises(EmoshieldError):
        reference_lr_schedule(epochs=0)
