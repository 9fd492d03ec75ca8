"""Alignment arithmetic (workers.scoring): the natural-log scale of published numbers, paired intervals, and how
one question's answers in two option orders combine."""

import numpy as np
import pytest

from workers.scoring import (
    NATURAL_LOG_FACTOR,
    alignment,
    bootstrap_ci,
    js_distance,
    natural_log_alignment,
    order_averaged,
    paired_bootstrap_ci,
)


def natural_log_js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance with the natural log, written out (scipy's default base)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return float(np.sqrt((kl(p) + kl(q)) / 2))


def pairs(n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(2, 7))
        p, q = rng.dirichlet(np.ones(k)), rng.dirichlet(np.ones(k))
        p[rng.random(k) < 0.2] = 0  # disjoint supports too
        if p.sum() == 0:
            p[0] = 1
        yield p, q


def test_natural_log_distance_is_base_2_distance_times_sqrt_ln_2():
    assert NATURAL_LOG_FACTOR == pytest.approx(0.8325546111576977)
    for p, q in pairs():
        assert natural_log_js_distance(p, q) == pytest.approx(
            js_distance(p, q) * NATURAL_LOG_FACTOR, abs=1e-12
        )
        assert 1 - natural_log_js_distance(p, q) == pytest.approx(natural_log_alignment(alignment(p, q)))
    assert natural_log_alignment(1.0) == 1.0  # a perfect match is perfect on either scale


def test_natural_log_alignment_matches_scipy_where_installed():
    distance = pytest.importorskip("scipy.spatial.distance")
    for p, q in pairs(20, seed=1):
        assert 1 - distance.jensenshannon(p, q) == pytest.approx(natural_log_alignment(alignment(p, q)))


def test_paired_interval_of_identical_columns_is_zero():
    a = np.random.default_rng(2).random(40)
    assert paired_bootstrap_ci(a, a, 200) == (0.0, 0.0)


@pytest.mark.parametrize("shift", [0.07, -0.25])
def test_paired_interval_of_a_constant_shift_is_that_shift(shift):
    b = np.random.default_rng(3).random(40)
    lo, hi = paired_bootstrap_ci(b + shift, b, 200)
    assert lo == pytest.approx(shift, abs=1e-12) and hi == pytest.approx(shift, abs=1e-12)


def test_paired_interval_resamples_the_same_records_for_both_columns():
    rng = np.random.default_rng(4)
    hard = rng.random(60)  # a shared per-record difficulty, much larger than the difference between columns
    a, b = hard + 0.02 + 0.01 * rng.standard_normal(60), hard
    lo, hi = paired_bootstrap_ci(a, b, 500)
    assert lo < 0.02 < hi and lo > 0  # the paired interval sees the small gain ...
    assert (
        bootstrap_ci(a, 500)[0] < bootstrap_ci(b, 500)[1]
    )  # ... that separate intervals of the columns cannot tell from noise
    assert paired_bootstrap_ci(a, b, 500) == (lo, hi)  # seeded: the same interval every time
    with pytest.raises(ValueError, match="one score a record"):
        paired_bootstrap_ci(a, b[:-1])


def asked_in_both_orders(content: np.ndarray, pull: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a model whose letter positions multiply its answer by `pull` says in the written order and in the
    reverse order (the latter in the reversed rendering's own option order)."""
    written = content * pull
    shown_reversed = content[::-1] * pull
    return written / written.sum(), shown_reversed / shown_reversed.sum()


def test_a_pull_that_grows_steadily_along_the_positions_cancels_exactly():
    content = np.array([0.1, 0.5, 0.3, 0.1])
    pull = 3.0 ** -np.arange(4)  # each letter a third as likely as the one before: a strong pull to "A"
    written, shown_reversed = asked_in_both_orders(content, pull)
    combined = order_averaged([written, shown_reversed], [False, True])
    assert combined == pytest.approx(content, abs=1e-12)
    # The plain mean keeps half of each order's pull: the option written first gains most.
    plain = (written + shown_reversed[::-1]) / 2
    assert abs(plain - content).max() > 0.1


def test_combining_orders_ignores_each_answers_scale_and_keeps_one_order_as_it_is():
    answer = np.array([0.2, 0.5, 0.3])
    assert order_averaged([answer], [False]) == pytest.approx(answer)
    assert order_averaged([answer * 7, answer[::-1] * 0.5], [False, True]) == pytest.approx(answer)
    assert order_averaged(
        [np.array([0.0, 1.0]), np.array([0.5, 0.5])], [False, False]
    ).sum() == pytest.approx(1)
