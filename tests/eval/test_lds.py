"""LDS: Spearman against a slow reference, planted linear datamodels whose right answer is known, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from attribindex.errors import AttribIndexError
from attribindex.eval._lds import linear_datamodeling_score, plot_lds, representative_queries, spearman

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reference_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson of average ranks, ranked by a plain loop: each value's rank is 1 + (# smaller) + (# equal - 1) / 2."""

    def ranks(values):
        return np.array([1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values])

    return float(np.corrcoef(ranks(list(x)), ranks(list(y)))[0, 1])


def planted(queries=60, examples=200, subsets=50, noise=0.3, seed=0):
    """A linear datamodel: true effects e[q, i], subsets at fraction 0.5, loss = c_q − Σ_{i ∈ S} e[q, i] + noise."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(size=(queries, examples))  # (Q, N)
    members = rng.random((subsets, examples)) < 0.5  # (M, N)
    offsets = rng.uniform(2, 6, size=queries)  # (Q,)
    losses = offsets - members @ effects.T + noise * rng.normal(size=(subsets, queries))  # (M, Q)
    return effects, members, losses, rng


def test_spearman_equals_pearson_of_average_ranks_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(23, 7)).astype(float)  # few distinct values: many ties
    b = rng.integers(0, 4, size=(23, 7)) + 0.5 * rng.integers(0, 2, size=(23, 7))
    got = spearman(a, b)
    expected = [reference_spearman(a[:, j], b[:, j]) for j in range(a.shape[1])]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    continuous = rng.normal(size=(15, 3))
    other = rng.normal(size=(15, 3))
    expected = [reference_spearman(continuous[:, j], other[:, j]) for j in range(3)]
    np.testing.assert_allclose(spearman(continuous, other), expected, rtol=1e-12, atol=1e-12)


def test_spearman_monotone_reversed_and_constant_columns():
    x = np.random.default_rng(2).normal(size=(10, 1))
    monotone = np.exp(x) * 3 + 1  # any increasing map: ranks unchanged
    np.testing.assert_allclose(spearman(x, monotone), [1.0])
    np.testing.assert_allclose(spearman(x, -(x**3)), [-1.0])
    a = np.column_stack([x[:, 0], np.full(10, 2.0), x[:, 0]])
    b = np.column_stack([x[:, 0], x[:, 0], np.zeros(10)])
    rho = spearman(a, b)
    assert rho[0] == pytest.approx(1.0) and np.isnan(rho[1]) and np.isnan(rho[2])
    with pytest.raises(AttribIndexError, match="same shape"):
        spearman(a, b[:, :2])


def test_planted_datamodel_true_effects_score_near_one_and_negated_near_minus_one():
    effects, members, losses, _ = planted()
    result = linear_datamodeling_score(effects, members, losses)
    assert result.score > 0.9 and result.valid_queries == 60
    assert result.low <= result.score <= result.high and result.high - result.low < 0.05
    assert result.per_query.shape == (60,) and result.predictions.shape == (50, 60)
    np.testing.assert_allclose(result.predictions, members.astype(float) @ effects.T)
    assert result.format().startswith(f"LDS {result.score:.3f} (95% CI ")
    assert result.format().endswith("over 60 of 60 queries, 50 subsets")
    assert linear_datamodeling_score(-effects, members, losses).score < -0.9


def test_random_scores_have_no_lds_and_noise_lowers_it():
    effects, members, losses, rng = planted()
    random = linear_datamodeling_score(rng.normal(size=effects.shape), members, losses)
    assert abs(random.score) < 0.2 and random.low < 0 < random.high
    noisy = [
        linear_datamodeling_score(effects + level * rng.normal(size=effects.shape), members, losses).score
        for level in (0.5, 2.0, 8.0)
    ]
    assert noisy[0] > noisy[1] > noisy[2] > random.score - 0.1, noisy
    assert noisy[0] < 0.95  # the noise is large enough to show


def test_an_example_that_lowers_the_loss_gets_a_positive_score_and_a_positive_lds():
    rng = np.random.default_rng(3)
    members = rng.random((40, 5)) < 0.5  # (M, N)
    helpful = members[:, 2].astype(float)  # training on example 2 lowers the query's loss by 1
    losses = (3.0 - helpful + 0.05 * rng.normal(size=40))[:, None]  # (M, 1)
    proponent = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]])  # positive score: a proponent
    result = linear_datamodeling_score(proponent, members, losses)
    assert result.score > 0.8  # two-valued predictions: ties, and still near the best possible
    assert linear_datamodeling_score(-proponent, members, losses).score < -0.8
    integers = linear_datamodeling_score(proponent, members.astype(np.int8), losses, bootstrap=0)
    assert integers.score == result.score  # a 0/1 mask is the same mask


def test_bootstrap_is_seeded_and_can_be_turned_off():
    effects, members, losses, rng = planted(queries=30, noise=5.0)
    scores = effects + rng.normal(size=effects.shape)
    first = linear_datamodeling_score(scores, members, losses, seed=7)
    again = linear_datamodeling_score(scores, members, losses, seed=7)
    other = linear_datamodeling_score(scores, members, losses, seed=8)
    assert (first.low, first.high) == (again.low, again.high)
    assert (first.low, first.high) != (other.low, other.high)
    assert first.score == other.score  # the seed moves the interval only
    narrower = linear_datamodeling_score(scores, members, losses, seed=7, confidence=0.5)
    assert first.low < narrower.low <= narrower.high < first.high
    assert "50% CI" in narrower.format()
    off = linear_datamodeling_score(scores, members, losses, bootstrap=0)
    assert np.isnan(off.low) and np.isnan(off.high) and off.score == first.score
    assert "no interval" in off.format() and off.to_dict()["low"] is None


def test_bad_inputs_are_refused_with_the_cause_and_the_fix():
    effects, members, losses, _ = planted(queries=4, examples=10, subsets=6)
    with pytest.raises(AttribIndexError, match=r"2-D \(Q, N\)"):
        linear_datamodeling_score(effects[0], members, losses)
    with pytest.raises(AttribIndexError, match="covers 10 training examples .* subsets covers 9"):
        linear_datamodeling_score(effects, members[:, :9], losses)
    with pytest.raises(AttribIndexError, match=r"transposed: pass losses\.T"):
        linear_datamodeling_score(effects, members, losses.T)
    with pytest.raises(AttribIndexError, match="at least 3"):
        linear_datamodeling_score(effects, members[:2], losses[:2])
    bad = losses.copy()
    bad[4, 1] = np.nan
    with pytest.raises(AttribIndexError, match=r"losses holds 1 NaN .* losses\[4, 1\].* drop that row"):
        linear_datamodeling_score(effects, members, bad)
    infinite = effects.copy()
    infinite[2, 7] = -np.inf
    with pytest.raises(AttribIndexError, match=r"scores\[2, 7\]"):
        linear_datamodeling_score(infinite, members, losses)
    with pytest.raises(AttribIndexError, match="boolean .* membership mask"):
        linear_datamodeling_score(effects, members * 2, losses)
    with pytest.raises(AttribIndexError, match="constant across the 6 subsets for 4 of 4 queries.*more subsets"):
        linear_datamodeling_score(effects, members, np.ones_like(losses))
    with pytest.raises(AttribIndexError, match="predicted sums are constant for 4 of 4"):
        linear_datamodeling_score(effects, np.ones_like(members), losses)  # every subset is the full set
    with pytest.raises(AttribIndexError, match="bootstrap"):
        linear_datamodeling_score(effects, members, losses, bootstrap=-1)
    with pytest.raises(AttribIndexError, match="confidence"):
        linear_datamodeling_score(effects, members, losses, confidence=95)


def test_partly_undefined_queries_are_left_out_of_the_mean():
    effects, members, losses, _ = planted(queries=5)
    losses[:, 3] = 1.0  # this query's subset models all agree: no ranking
    result = linear_datamodeling_score(effects, members, losses)
    assert np.isnan(result.per_query[3]) and result.valid_queries == 4
    assert result.score == pytest.approx(np.nanmean(result.per_query))
    assert "over 4 of 5 queries" in result.format() and result.to_dict()["per_query"][3] is None


def test_plot_writes_a_png_of_the_best_median_and_worst_queries(tmp_path):
    effects, members, losses, rng = planted(queries=8)
    losses[:, 5] = 2.0  # undefined: never picked by default
    result = linear_datamodeling_score(effects + 1.5 * rng.normal(size=effects.shape), members, losses)
    picked = representative_queries(result)
    defined = [q for q in range(8) if q != 5]
    by_score = sorted(defined, key=lambda q: result.per_query[q])
    assert picked == [by_score[-1], by_score[len(by_score) // 2], by_score[0]]
    assert len(set(result.per_query[picked])) == 3  # three distinct values: the order is a real check
    path = plot_lds(result, losses, tmp_path / "lds.png", title="planted")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    chosen = plot_lds(result, losses, str(tmp_path / "two.png"), queries=[0, 5], labels=["first", "flat " * 20])
    assert chosen.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(AttribIndexError, match="one label per query"):
        plot_lds(result, losses, tmp_path / "x.png", queries=[0, 1], labels=["only one"])
    with pytest.raises(AttribIndexError, match="same losses"):
        plot_lds(result, losses.T, tmp_path / "x.png")
