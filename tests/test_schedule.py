import math

import pytest

from trl_chord import chord_mu
from trl_chord.schedule import MuSchedule


def test_warmup_is_linear_from_zero_to_peak():
    values = [chord_mu(step, peak=0.8, valley=0.2, warmup_steps=4, decay_steps=10) for step in range(5)]
    assert values == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_cosine_decay_hits_peak_midpoint_and_valley():
    peak, valley, warmup, decay = 0.9, 0.05, 3, 200
    assert chord_mu(warmup, peak, valley, warmup, decay) == pytest.approx(peak)
    # Half-way through the decay the cosine is 0, so mu is the mean of peak and valley
    assert chord_mu(warmup + 100, peak, valley, warmup, decay) == pytest.approx((peak + valley) / 2)
    # A quarter of the way: cos(pi / 4) = sqrt(2) / 2
    expected = valley + (peak - valley) * (1 + math.sqrt(2) / 2) / 2
    assert chord_mu(warmup + 50, peak, valley, warmup, decay) == pytest.approx(expected)
    assert chord_mu(warmup + decay, peak, valley, warmup, decay) == valley
    assert chord_mu(warmup + decay + 1000, peak, valley, warmup, decay) == valley


def test_decay_is_monotone():
    values = [chord_mu(step, 0.9, 0.05, 0, 200) for step in range(0, 201)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(0.9) and values[-1] == 0.05


def test_no_warmup_no_decay_is_constant_valley():
    assert {chord_mu(step, peak=0.7, valley=0.1, warmup_steps=0, decay_steps=0) for step in range(50)} == {0.1}


def test_warmup_without_decay_drops_to_valley():
    assert chord_mu(1, 0.6, 0.0, 2, 0) == pytest.approx(0.3)
    assert chord_mu(2, 0.6, 0.0, 2, 0) == 0.0


@pytest.mark.parametrize(
    "peak, valley, warmup, decay, expected",
    [
        (0.0, 0.0, 5, 5, False),
        (0.5, 0.0, 0, 0, False),
        (0.5, 0.0, 0, 3, True),
        (0.5, 0.0, 2, 0, True),
        (0, 0.1, 0, 0, True),
    ],
)
def test_mu_ever_positive_matches_the_schedule(peak, valley, warmup, decay, expected):
    assert MuSchedule(peak, valley, warmup, decay).is_ever_positive() is expected
    assert any(chord_mu(step, peak, valley, warmup, decay) > 0 for step in range(20)) is expected


def test_the_schedule_object_follows_the_step_or_the_reward_by_its_kind():
    cosine = MuSchedule(peak=1.0, valley=0.5, warmup_steps=1, decay_steps=3)
    assert cosine.mu == 0.0 and not cosine.adaptive and cosine.reaches_one()
    cosine.observe_mean_reward(-5.0)  # rewards do not move the cosine schedule
    assert cosine.mu == 0.0
    cosine.start_step(1)
    assert cosine.mu == chord_mu(1, 1.0, 0.5, 1, 3) == 1.0 and cosine.skips_on_policy_term()
    cosine.start_step(2)
    assert cosine.mu == pytest.approx(0.875) and not cosine.skips_on_policy_term()

    adaptive = MuSchedule(peak=1.0, valley=1.0, adaptive_tau=0.75)
    assert adaptive.mu == 0.0 and adaptive.adaptive and not adaptive.reaches_one()
    adaptive.start_step(7)  # steps do not move the adaptive schedule
    assert adaptive.mu == 0.0
    adaptive.observe_mean_reward(0.25)
    assert adaptive.mu == 0.5
    adaptive.observe_mean_reward(-2.0)  # capped at 1, and still never skips: it needs every step's rollouts
    assert adaptive.mu == 1.0 and not adaptive.skips_on_policy_term()
    assert adaptive.is_ever_positive() and not MuSchedule(adaptive_tau=0.0).is_ever_positive()
