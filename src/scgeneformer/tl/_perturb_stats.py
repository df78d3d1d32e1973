"""Statistics of an in silico screen: per-gene shifts tested against null genes.

Deleting any highly ranked gene moves a cell more than deleting a lowly ranked one, so raw
shifts mostly restate expression rank. Each (cell, gene) shift is therefore first compared
with the shifts of the *other* genes deleted in the same cell at nearby rank positions (a
leave-one-out local linear fit); a gene's z-score is the mean of these residuals over the
cells that express it, scaled by the pooled residual spread.

A gene's p-value answers "does this gene stand out from the null genes of this screen, in the
tested direction": its z-score is set against the null genes' z-scores (Efron's empirical
null: their median and MAD, with a Student t tail for the spread's estimation from ``m``
genes), and it is never smaller than the smallest p-value a sign test across its cells could
give (``2**-n`` with ``n`` cells, one-sided): a gene seen in 15 cells cannot get less than
3e-5, however far it lies from the null, because 15 cells cannot show more than that. The
floor only cuts the far tail, so p-values stay uniform under the null. Benjamini-Hochberg
turns p-values into FDR.

A purely rank-based p-value against the screen's own genes (``(1 + k) / (1 + m)``) is not used
for ``genes="all"``: there the hits are among each other's null, the ``j``-th best gene gets
``j / (m + 1)``, and Benjamini-Hochberg then gives every gene an FDR near 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

# Other deleted genes on each side of a position that form its rank-matched baseline.
RANK_WINDOW = 10
ALTERNATIVES = ("greater", "less", "two-sided")
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class GeneStats:
    """Per-gene results of a screen, indexed by token id."""

    token: np.ndarray
    shift: np.ndarray
    n_cells: np.ndarray
    zscore: np.ndarray
    pval: np.ndarray
    fdr: np.ndarray
    ci_low: np.ndarray  # 95% confidence interval of the mean shift across cells
    ci_high: np.ndarray
    frac_toward: np.ndarray  # share of cells whose score is positive
    n_null: np.ndarray  # null genes each gene was compared with


def _window_sums(values: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    csum = np.r_[0.0, np.cumsum(values)]
    return csum[right] - csum[left]


def rank_residuals(
    cell: np.ndarray,
    position: np.ndarray,
    score: np.ndarray,
    window: int = RANK_WINDOW,
    baseline: np.ndarray | None = None,
) -> np.ndarray:
    """Each score minus what the other genes deleted near it in the same cell predict.

    Within a cell the deletions are ordered by position; the baseline of one is a straight
    line in position fitted to up to ``window`` deletions on either side of it,
    itself excluded (a leave-one-out local linear fit, so that the steep top of the ranking
    and its edges are followed, not averaged away). With ``baseline`` (a boolean mask) only
    those deletions form the fit, e.g. a random background beside candidates chosen for their
    estimated shifts.

    Examples
    --------
    >>> cell = np.zeros(6, dtype=int)
    >>> trend = 2.0 - 0.3 * np.arange(6)
    >>> np.allclose(rank_residuals(cell, np.arange(6), trend, window=2), 0.0)
    True
    """
    order = np.lexsort((position, cell))
    sorted_cell = cell[order]
    x_all = position[order].astype(np.float64)
    y_all = score[order].astype(np.float64)
    in_all = np.ones(len(order), bool) if baseline is None else np.asarray(baseline)[order]
    starts = np.flatnonzero(np.r_[True, sorted_cell[1:] != sorted_cell[:-1]])
    ends = np.r_[starts[1:], len(order)]
    residual = np.full(len(order), np.nan)
    for lo, hi in zip(starts, ends, strict=True):
        x, y, own = x_all[lo:hi], y_all[lo:hi], in_all[lo:hi].astype(np.int64)
        xb, yb = x[own == 1], y[own == 1]
        n = len(xb)
        if n < 3:
            continue
        # Each deletion's place among the baseline deletions, and its window there.
        idx = np.cumsum(own) - own
        left, right = np.maximum(idx - window, 0), np.minimum(idx + own + window, n)
        # Sums over the window without the point itself.
        count = right - left - own
        sx = _window_sums(xb, left, right) - own * x
        sy = _window_sums(yb, left, right) - own * y
        sxx = _window_sums(xb * xb, left, right) - own * x * x
        sxy = _window_sums(xb * yb, left, right) - own * x * y
        denominator = count * sxx - sx * sx
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(
                np.abs(denominator) > 1e-12, (count * sxy - sx * sy) / denominator, 0.0
            )
        predicted = (sy - slope * sx) / count + slope * x
        residual[lo:hi] = y - predicted
    out = np.empty_like(residual)
    out[order] = residual
    return out


def check_alternative(alternative: str) -> None:
    """Refuse an unknown test direction, naming the three there are."""
    if alternative not in ALTERNATIVES:
        raise ValueError(
            f"alternative must be one of {ALTERNATIVES}, got {alternative!r}: 'greater' tests "
            "that the perturbation moves cells toward the goal, 'less' away from it."
        )


def null_pvalues(
    z: np.ndarray, null: np.ndarray, alternative: str
) -> tuple[np.ndarray, np.ndarray]:
    """Each z-score against the empirical null of the null genes' z-scores.

    The null is centred at the null genes' median and scaled by their MAD (as a standard
    deviation), a null gene itself left out of its own; as that spread is estimated from
    ``m`` genes, the tail is Student's t with ``m - 1`` degrees of freedom, so that few null
    genes give wide p-values. Fewer than three null genes give p = 1.

    Returns
    -------
    p-values and the number of null genes each was compared with.

    Examples
    --------
    >>> z = np.array([0.3, -0.5, 0.1, 1.2, -1.0, 0.0, 0.6, -0.2, 6.0])
    >>> p, m = null_pvalues(z, np.ones(9, dtype=bool), "greater")
    >>> bool(p[-1] < 0.01 < p[:-1].min()), int(m[0])
    (True, 8)
    """
    centre = np.full(len(z), np.nan)
    scale = np.full(len(z), np.nan)
    null_z = z[null]
    if len(null_z):
        middle = np.median(null_z)
        centre[~null] = middle
        scale[~null] = _MAD_TO_SD * np.median(np.abs(null_z - middle))
    for i, at in enumerate(np.flatnonzero(null)):
        others = np.delete(null_z, i)
        centre[at] = np.median(others) if len(others) else np.nan
        scale[at] = _MAD_TO_SD * np.median(np.abs(others - centre[at])) if len(others) else np.nan
    m = np.full(len(z), len(null_z)) - null.astype(np.int64)
    df = np.maximum(m - 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (z - centre) / np.where(scale > 0, scale, np.nan)
    if alternative == "greater":
        p = stats.t.sf(u, df)
    elif alternative == "less":
        p = stats.t.cdf(u, df)
    else:
        p = 2 * stats.t.sf(np.abs(u), df)
    p = np.where(np.isfinite(p) & (m >= 3), p, 1.0)
    return np.minimum(p, 1.0), m


def min_pvalue(n_cells: np.ndarray | int, alternative: str) -> np.ndarray:
    """Give the smallest p-value a gene perturbed in ``n_cells`` cells may get.

    It is the smallest a sign test across those cells can give: ``2**-n_cells`` one-sided,
    ``2**(1 - n_cells)`` two-sided. Every p-value of a screen is floored there.

    Examples
    --------
    >>> float(min_pvalue(15, "greater"))
    3.0517578125e-05
    >>> float(min_pvalue(5, "two-sided"))
    0.0625
    """
    check_alternative(alternative)
    sided = 2.0 if alternative == "two-sided" else 1.0
    return np.minimum(1.0, sided * 0.5 ** np.asarray(n_cells, dtype=np.float64))


def gene_statistics(
    cell: np.ndarray,
    token: np.ndarray,
    position: np.ndarray,
    score: np.ndarray,
    *,
    min_cells: int,
    alternative: str = "greater",
    null_tokens: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
) -> GeneStats:
    """Mean shift, its interval, cells, and the test of every gene perturbed in a screen.

    Parameters
    ----------
    cell, token, position, score
        One entry per (cell, perturbed gene): cell index, gene token, its position in the
        cell's token list, and the shift.
    min_cells
        Genes perturbed in fewer cells get no p-value (NaN) and do not enter the null.
    alternative
        ``"greater"``: the gene's rank-adjusted score is higher than the null genes' (with
        states: its perturbation moves cells toward the goal); ``"less"``; ``"two-sided"``.
    null_tokens
        The genes to test against (a background); ``None``: every other testable gene. With
        a background, FDR covers only the genes outside it (the ones under test); the
        background genes get a p-value against the rest of the background, and no FDR.
    baseline
        Boolean mask of the perturbations that form the rank-matched baselines and the
        pooled residual spread (default: all), see :func:`rank_residuals`.

    Returns
    -------
    :class:`GeneStats`, one entry per distinct token.
    """
    check_alternative(alternative)
    residual = rank_residuals(cell, position, score, baseline=baseline)
    frame = pd.DataFrame(
        {
            "token": token,
            "score": score,
            "residual": residual,
            "toward": score > 0,
            "has_residual": np.isfinite(residual),
        }
    )
    grouped = frame.groupby("token", sort=True)
    shift = grouped["score"].mean().to_numpy()
    n_cells = grouped["score"].size().to_numpy()
    sd = grouped["score"].std().to_numpy()
    mean_residual = grouped["residual"].mean().to_numpy()
    spread = residual if baseline is None else residual[np.asarray(baseline)]
    finite = spread[np.isfinite(spread)]
    pooled_sd = finite.std() if len(finite) > 1 else np.nan
    z = mean_residual * np.sqrt(n_cells) / (pooled_sd if pooled_sd > 0 else np.nan)
    genes = grouped["score"].mean().index.to_numpy()
    testable = (n_cells >= min_cells) & np.isfinite(z)
    null = testable if null_tokens is None else testable & np.isin(genes, null_tokens)
    tested = testable if null_tokens is None else testable & ~null
    pval = np.full(len(z), np.nan)
    n_null = np.zeros(len(z), dtype=np.int64)
    against_null, m = null_pvalues(z[testable], null[testable], alternative)
    floor = min_pvalue(grouped["has_residual"].sum().to_numpy()[testable], alternative)
    pval[testable] = np.maximum(against_null, floor)
    n_null[testable] = m
    fdr = np.full(len(z), np.nan)
    if tested.any():
        fdr[tested] = stats.false_discovery_control(pval[tested], method="bh")
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.975, n_cells - 1) * sd / np.sqrt(n_cells)
    return GeneStats(
        token=genes,
        shift=shift,
        n_cells=n_cells,
        zscore=z,
        pval=pval,
        fdr=fdr,
        ci_low=shift - half,
        ci_high=shift + half,
        frac_toward=grouped["toward"].mean().to_numpy(),
        n_null=n_null,
    )


def null_description(background: bool) -> str:
    """Say what a screen's p-values were tested against, for ``uns[key]["null"]``."""
    genes = (
        "a random rank-matched background of genes expressed in the same cells"
        if background
        else "the other genes of the screen"
    )
    return (
        "rank-adjusted z-score against the empirical null (median, MAD; Student t with m-1 "
        "degrees of freedom for m null genes) of " + genes + "; never below the smallest "
        "p-value of a sign test across the gene's n cells (2^-n one-sided, 2^(1-n) "
        "two-sided); Benjamini-Hochberg FDR"
    )
