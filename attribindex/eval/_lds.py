"""Linear datamodeling score (LDS): do attribution scores predict what retraining on a subset does to a query?

The ground truth is counterfactual: M models retrained on random subsets S_m of the N training examples, and
each one's loss on Q queries. Attribution scores are read as an additive datamodel: the prediction for subset m
and query q is the sum of the scores of the examples it holds. A positive score marks a proponent (training on
it lowers the query's loss), so the LDS of a query is the Spearman correlation over subsets between the
predicted sums and the negated losses; the method's LDS is the mean over queries, with a percentile bootstrap
over queries for its interval. Only the ranking of subsets matters: scores need no calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribindex.errors import AttribIndexError
from attribindex.query import one_line

MIN_SUBSETS = 3  # two points always correlate perfectly (±1): a rank correlation needs at least three
PLOT_LABEL_CHARS = 48  # a query label longer than this is cut in a panel title


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays is ambiguous, and arrays are unhashable
class LdsResult:
    """The LDS of one attribution method against one set of retrained subset models.

    Example:
        >>> result = linear_datamodeling_score(scores, subsets, losses)  # doctest: +SKIP
        >>> print(result.format())  # doctest: +SKIP
        LDS 0.231 (95% CI 0.180–0.279) over 40 of 40 queries, 50 subsets
    """

    score: float  # mean Spearman over the queries where it is defined
    low: float  # bootstrap interval bounds; NaN when bootstrap=0
    high: float
    confidence: float  # e.g. 0.95
    per_query: np.ndarray  # (Q,) Spearman per query, NaN where undefined
    predictions: np.ndarray  # (M, Q) predicted sums: Σ_{i ∈ S_m} scores[q, i]
    valid_queries: int  # queries with a defined correlation

    @property
    def queries(self) -> int:
        return self.predictions.shape[1]

    @property
    def subsets(self) -> int:
        return self.predictions.shape[0]

    def format(self) -> str:
        """One line: the score, its interval and what it was measured over."""
        if np.isnan(self.low):
            interval = "no interval: bootstrap=0"
        else:
            interval = f"{self.confidence * 100:g}% CI {self.low:.3f}–{self.high:.3f}"
        return (
            f"LDS {self.score:.3f} ({interval}) over {self.valid_queries} of {self.queries} queries, "
            f"{self.subsets} subsets"
        )

    def to_dict(self) -> dict:
        """A JSON-ready record; per-query values that are undefined are None."""
        return {
            "score": self.score,
            "low": None if np.isnan(self.low) else self.low,
            "high": None if np.isnan(self.high) else self.high,
            "confidence": self.confidence,
            "valid_queries": self.valid_queries,
            "queries": self.queries,
            "subsets": self.subsets,
            "per_query": [None if np.isnan(v) else float(v) for v in self.per_query],
        }


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Column-wise ranks 1..M of an (M, Q) array, tied values sharing the mean of the ranks they span."""
    m = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")  # (M, Q)
    ordered = np.take_along_axis(x, order, axis=0)  # (M, Q) each column ascending
    position = np.arange(m)[:, None]  # (M, 1)
    differs = ordered[1:] != ordered[:-1]  # (M-1, Q) a new run of equal values starts below
    starts = np.concatenate([np.ones((1, x.shape[1]), bool), differs])  # (M, Q) first of its run
    ends = np.concatenate([differs, np.ones((1, x.shape[1]), bool)])  # (M, Q) last of its run
    # Each position's run spans [first, last]: the latest start at or above it, the earliest end at or below.
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=0)  # (M, Q)
    last = np.minimum.accumulate(np.where(ends, position, m - 1)[::-1], axis=0)[::-1]  # (M, Q)
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=0)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Spearman correlation of (M, Q) arrays `a` and `b`: the Pearson correlation of their average
    ranks (ties share a rank). NaN for a column where either side is constant (no ranking, no correlation) or holds a NaN.

    Example:
        >>> spearman(np.array([[1.0], [2.0], [3.0]]), np.array([[10.0], [30.0], [20.0]]))
        array([0.5])
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise AttribIndexError(
            f"spearman needs two (M, Q) arrays of the same shape (rows: observations, columns: what to correlate), "
            f"got {a.shape} and {b.shape}. Reshape a single series with x[:, None]."
        )
    ra = average_ranks(a) - (a.shape[0] + 1) / 2  # (M, Q) centred: mean rank is (M+1)/2, ties or not
    rb = average_ranks(b) - (b.shape[0] + 1) / 2
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)  # (Q,) decided on the values, not round-off
    missing = np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0)  # (Q,) NaN has no rank
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=0) / np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))  # (Q,)
    return np.where(constant | missing, np.nan, np.clip(rho, -1.0, 1.0))


def linear_datamodeling_score(
    scores: np.ndarray,
    subsets: np.ndarray,
    losses: np.ndarray,
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LdsResult:
    """LDS of attribution `scores` against the losses of models retrained on random `subsets`.

    The predictions are one dense product, ``subsets @ scores.T`` in float64: memory is about 8·(M + Q)·N bytes
    for the float64 copies plus the (M, Q) result, e.g. 80 MB per 100 subsets or queries at N = 1e5. That is fine
    at the sizes LDS is run at (N up to ~1e5, M ~ 100); larger problems should split the queries and combine
    the `per_query` values.

    Args:
        scores: (Q, N) float, scores[q, i] = influence of training example i on query q; positive = proponent
            (training on i lowers q's loss). All finite: every example in a subset must have a score.
        subsets: (M, N) bool or 0/1, subsets[m, i] = example i was in the training set of subset model m.
        losses: (M, Q) float, the loss of subset model m on query q. For a metric where higher is better
            (log-probability, accuracy) pass its negation.
        bootstrap: resamples of the queries for the percentile interval; 0 for no interval (low = high = NaN).
        confidence: the interval's coverage, in (0, 1).
        seed: seeds the bootstrap, so the same inputs give the same interval.

    Example:
        >>> result = linear_datamodeling_score(scores, subsets, losses, bootstrap=1000)  # doctest: +SKIP
        >>> result.score, (result.low, result.high)  # doctest: +SKIP
        (0.231, (0.180, 0.279))
    """
    scores, subsets, losses = _checked(scores, subsets, losses)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise AttribIndexError(f"bootstrap must be a whole number >= 0 (0: no interval), got {bootstrap!r}.")
    if not 0 < confidence < 1:
        raise AttribIndexError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}.")
    predictions = subsets.astype(np.float64) @ scores.T  # (M, N) @ (N, Q) → (M, Q)
    per_query = spearman(predictions, -losses)  # (Q,) minus: a good method predicts high where loss is low
    valid = ~np.isnan(per_query)
    if not valid.any():
        _raise_undefined(predictions, losses)
    values = per_query[valid]  # (V,)
    low = high = float("nan")
    if bootstrap:
        draws = np.random.default_rng(seed).integers(0, len(values), size=(bootstrap, len(values)))  # (B, V)
        means = values[draws].mean(axis=1)  # (B,)
        tail = (1 - confidence) / 2
        low, high = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    per_query.setflags(write=False)  # the result is frozen; so are its arrays
    predictions.setflags(write=False)
    return LdsResult(
        score=float(values.mean()),
        low=low,
        high=high,
        confidence=float(confidence),
        per_query=per_query,
        predictions=predictions,
        valid_queries=int(valid.sum()),
    )


def lds_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of LDS results: one row per dict, the `columns` keys first, then LDS and its interval.

    Example:
        >>> print(lds_table([{"hessian": "raw", "rank": 32, "lds": result}], ["hessian", "rank"]))  # doctest: +SKIP
        | hessian | rank | LDS | 95 % CI |
        | --- | --- | --- | --- |
        | raw | 32 | 0.244 | 0.206 – 0.281 |
    """
    lines = [
        "| " + " | ".join(columns + ["LDS", "95 % CI"]) + " |",
        "| " + " | ".join(["---"] * (len(columns) + 2)) + " |",
    ]
    for row in rows:
        lds: LdsResult = row["lds"]
        cells = [str(row.get(key, "-")) for key in columns] + [f"{lds.score:.3f}", f"{lds.low:.3f} – {lds.high:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lds_records(rows: list[dict]) -> list[dict]:
    """`rows` for JSON: each `lds` LdsResult replaced by its score and interval bounds."""
    return [
        {k: v for k, v in row.items() if k != "lds"}
        | {"lds": row["lds"].score, "low": row["lds"].low, "high": row["lds"].high}
        for row in rows
    ]


def representative_queries(result: LdsResult) -> list[int]:
    """The queries `plot_lds` shows by default: best, median and worst defined LDS (fewer if fewer are defined).

    Example:
        >>> representative_queries(result)  # doctest: +SKIP
        [17, 3, 29]
    """
    defined = np.flatnonzero(~np.isnan(result.per_query))  # (V,)
    ascending = defined[np.argsort(result.per_query[defined], kind="stable")]  # (V,) worst first
    picks = [int(ascending[-1]), int(ascending[len(ascending) // 2]), int(ascending[0])]
    return list(dict.fromkeys(picks))  # one panel per query when fewer than three are defined


def plot_lds(
    result: LdsResult,
    losses: np.ndarray,
    path: Path | str,
    queries: list[int] | None = None,
    labels: list[str] | None = None,
    title: str = "",
) -> Path:
    """Predicted sum against actual subset loss, one panel per query, written as a PNG.

    A good method's points fall from left to right: subsets predicted to help the query most have the lowest loss.

    Args:
        losses: the (M, Q) losses `result` was computed from.
        queries: query columns to show (default: `representative_queries`, the best, median and worst).
        labels: one short text per entry of `queries` (e.g. the query text), shown in its panel title.
        title: put before the overall LDS in the figure title.

    Example:
        >>> plot_lds(result, losses, "lds.png", title="LoGra, 50 subsets")  # doctest: +SKIP
        PosixPath('lds.png')
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != result.predictions.shape:
        raise AttribIndexError(
            f"losses has shape {losses.shape} but the result was computed from (M, Q) = {result.predictions.shape}. "
            f"Pass the same losses array given to linear_datamodeling_score."
        )
    queries = representative_queries(result) if queries is None else [int(q) for q in queries]
    if not queries or any(not 0 <= q < result.queries for q in queries):
        raise AttribIndexError(
            f"queries must be a non-empty list of columns in 0..{result.queries - 1}, got {queries}."
        )
    if labels is not None and len(labels) != len(queries):
        raise AttribIndexError(
            f"{len(labels)} labels for {len(queries)} queries: pass one label per query shown, or none."
        )
    import matplotlib

    matplotlib.use("Agg")  # headless: no display is needed or used
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(queries), figsize=(4 * len(queries), 4), dpi=120, squeeze=False)
    for panel, (axis, q) in enumerate(zip(axes[0], queries)):
        rho = result.per_query[q]
        label = f"query {q}" if labels is None else one_line(labels[panel], PLOT_LABEL_CHARS)
        axis.scatter(result.predictions[:, q], losses[:, q], s=14, alpha=0.7, color="tab:blue")
        axis.set_title(f"{label}\nSpearman {'undefined' if np.isnan(rho) else f'{rho:.3f}'}", fontsize=9)
        axis.set_xlabel("predicted: Σ scores over the subset", fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("loss of the subset model", fontsize=8)
    figure.suptitle(f"{title}: {result.format()}" if title else result.format(), fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def _checked(scores, subsets, losses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three inputs as float64 / bool arrays of agreeing shapes, or an error naming what is wrong."""
    scores, subsets, losses = np.asarray(scores), np.asarray(subsets), np.asarray(losses)
    for name, array, shape in (
        ("scores", scores, "(Q, N)"),
        ("subsets", subsets, "(M, N)"),
        ("losses", losses, "(M, Q)"),
    ):
        if array.ndim != 2:
            raise AttribIndexError(
                f"{name} must be a 2-D {shape} array, got shape {array.shape}. "
                f"For a single query, pass scores[None, :] and losses[:, None]."
            )
        if array.dtype.kind not in "biuf":
            raise AttribIndexError(f"{name} must be numeric, got dtype {array.dtype}. Convert it to a numeric array.")
    (q, n), (m, n_subsets) = scores.shape, subsets.shape
    if n_subsets != n:
        raise AttribIndexError(
            f"scores covers {n} training examples (N, its columns) but subsets covers {n_subsets}. "
            f"Score every training example the subsets are drawn from, in the same order."
        )
    if m < MIN_SUBSETS:
        raise AttribIndexError(
            f"{m} subsets: a rank correlation needs at least {MIN_SUBSETS} (use 50 or more for a useful LDS). "
            f"Retrain on more random subsets."
        )
    if losses.shape != (m, q):
        transposed = " It looks transposed: pass losses.T." if losses.shape == (q, m) else ""
        raise AttribIndexError(
            f"losses must be (M, Q) = ({m}, {q}): one row per subset, one column per query; "
            f"got {losses.shape}.{transposed}"
        )
    if subsets.dtype != bool:
        if not ((subsets == 0) | (subsets == 1)).all():
            raise AttribIndexError(
                "subsets must be a boolean (M, N) membership mask (or 0/1), but holds other values. "
                "From index lists, build it with mask = np.zeros((M, N), bool); mask[m, indices] = True."
            )
        subsets = subsets.astype(bool)
    _refuse_non_finite(
        "losses",
        losses,
        "a subset model diverged or its evaluation failed: rerun it, or drop that row of both subsets and losses.",
    )
    _refuse_non_finite("scores", scores, "check the gradients and damping of the attribution, then recompute.")
    return scores.astype(np.float64), subsets, losses.astype(np.float64)


def _refuse_non_finite(name: str, array: np.ndarray, fix: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise AttribIndexError(
            f"{name} holds {int(bad.sum())} NaN or infinite values, the first at {name}[{row}, {column}] "
            f"= {array[row, column]}. Fix: {fix}"
        )


def _raise_undefined(predictions: np.ndarray, losses: np.ndarray) -> None:
    q = losses.shape[1]
    flat_losses = int((np.ptp(losses, axis=0) == 0).sum())
    flat_predictions = int((np.ptp(predictions, axis=0) == 0).sum())
    raise AttribIndexError(
        f"no query has a defined LDS: the losses are constant across the {len(losses)} subsets for {flat_losses} "
        f"of {q} queries, and the predicted sums are constant for {flat_predictions} of {q} (identical subsets, a "
        f"subset fraction of 0 or 1, or zero scores on every example the subsets vary over). Fix: retrain on more "
        f"subsets, distinct and drawn at a fraction such as 0.5, and check that each row of losses comes from its "
        f"own subset model."
    )
