"""Train/validation/test splits of cells (stratified, or by group) and folds of genes."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a share in (0, 1) (or [0, 1)), else raise.

    Examples
    --------
    >>> check_fraction("test_size", 0.2)
    0.2
    """
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value < 1.0):
        bounds = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be in {bounds}, got {value}.")
    return value


def stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Hold out about ``fraction`` of each class's cells; a mask of the held-out ones.

    Every class with two or more cells gives at least one cell and keeps at least one; a class
    with a single cell keeps it.

    Examples
    --------
    >>> y = np.array([0] * 8 + [1] * 2)
    >>> held = stratified_holdout(y, 0.25, np.random.default_rng(0))
    >>> int(held[y == 0].sum()), int(held[y == 1].sum())
    (2, 1)
    """
    held = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        if len(members) < 2:
            continue
        n_held = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held[members[:n_held]] = True
    return held


def _split_cost(held: np.ndarray, target: float, proportions: np.ndarray) -> float:
    """How far a held-out class count vector is from the wanted size and class mix."""
    size = held.sum()
    if size == 0:
        return 2.0  # worse than any non-empty choice of a sensible size
    mix = 0.5 * np.abs(held / size - proportions).sum()  # total variation distance
    return abs(size - target) / target + mix


def group_holdout(
    y: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Hold out whole groups, about ``fraction`` of the cells, with classes mixed as overall.

    Groups are visited in random order and one is held out whenever that brings the held-out
    part closer to the wanted size and class proportions (the sum of the relative size error
    and the total-variation distance of the class mix). A group is skipped when holding it out
    would leave a class without any remaining cell, unless no split can avoid it. At least one
    group is held out and at least one kept.

    Parameters
    ----------
    y
        Integer class of each cell.
    groups
        Group of each cell (any hashable values).
    fraction
        Wanted share of cells held out.
    rng
        Random generator.

    Returns
    -------
    A mask of the held-out cells.

    Examples
    --------
    >>> y = np.array([0, 1] * 10)
    >>> groups = np.repeat(np.arange(5), 4)
    >>> held = group_holdout(y, groups, 0.2, np.random.default_rng(0))
    >>> len(set(groups[held]) & set(groups[~held]))
    0
    """
    group_codes, group_names = pd.factorize(pd.Series(groups), sort=False)
    n_groups = len(group_names)
    if n_groups < 2:
        raise ValueError("Splitting by group needs at least two groups.")
    n_classes = int(y.max()) + 1
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_codes, y), 1)
    total = counts.sum(axis=0)
    proportions = total / total.sum()
    target = fraction * total.sum()

    def keeps_every_class(held_counts: np.ndarray) -> bool:
        return bool(((total - held_counts)[total > 0] > 0).all())

    chosen = np.zeros(n_groups, dtype=bool)
    held = np.zeros(n_classes, dtype=np.int64)
    for group in rng.permutation(n_groups):
        if chosen.sum() == n_groups - 1:
            break
        candidate = held + counts[group]
        if not keeps_every_class(candidate):
            continue
        if _split_cost(candidate, target, proportions) < _split_cost(held, target, proportions):
            chosen[group], held = True, candidate
    if not chosen.any():
        # Every group alone overshoots (or empties a class): take the best single group.
        allowed = [g for g in range(n_groups) if keeps_every_class(counts[g])]
        if not allowed:
            allowed = list(range(n_groups))
            warnings.warn(
                "No split by group leaves every class on both sides; some class has cells in "
                "the held-out groups only and cannot be learned from.",
                UserWarning,
                stacklevel=3,
            )
        costs = [_split_cost(counts[g], target, proportions) for g in allowed]
        chosen[allowed[int(np.argmin(costs))]] = True
    return chosen[group_codes]


def _keeps_every_class(y: np.ndarray, held: np.ndarray) -> bool:
    return set(np.unique(y[~held])) == set(np.unique(y))


def split_cells(
    y: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    test_size: float = 0.2,
    val_size: float = 0.1,
    random_state: int | None = 0,
) -> np.ndarray:
    """Assign cells to ``"train"``, ``"val"`` and ``"test"``.

    The test part is about ``test_size`` of the cells: whole groups when ``groups`` is given
    (no group in both test and train/validation; :func:`group_holdout`), else about
    ``test_size`` of every class (:func:`stratified_holdout`). The validation part is about
    ``val_size`` of the rest, chosen the same way when at least two groups remain and whole
    groups fit (at most twice ``val_size``, every class kept for training); otherwise by cells
    of every class, as validation only serves early stopping.

    Parameters
    ----------
    y
        Integer class of each cell.
    groups
        Optional group (donor, patient, sample) of each cell.
    test_size
        Share of cells for testing, in (0, 1).
    val_size
        Share of the remaining cells for validation (early stopping), in [0, 1).
    random_state
        Seed.

    Returns
    -------
    An object array of ``"train"``/``"val"``/``"test"``, one per cell.

    Examples
    --------
    >>> y = np.array([0, 1] * 50)
    >>> split = split_cells(y, test_size=0.2, val_size=0.1)
    >>> [int((split == s).sum()) for s in ("train", "val", "test")]
    [72, 8, 20]
    """
    test_size = check_fraction("test_size", test_size)
    val_size = check_fraction("val_size", val_size, allow_zero=True)
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    split = np.full(len(y), "train", dtype=object)
    if groups is None:
        test = stratified_holdout(y, test_size, rng)
    else:
        groups = np.asarray(groups)
        test = group_holdout(y, groups, test_size, rng)
    split[test] = "test"
    if val_size == 0.0:
        return split
    rest = np.flatnonzero(~test)
    val = validation_holdout(y[rest], None if groups is None else groups[rest], val_size, rng)
    split[rest[val]] = "val"
    return split


def validation_holdout(
    y: np.ndarray, groups: np.ndarray | None, val_size: float, rng: np.random.Generator
) -> np.ndarray:
    """Hold out about ``val_size`` of the cells for validation; a mask of them.

    Whole groups when ``groups`` holds at least two and whole groups fit (at most twice
    ``val_size``, every class kept for training); otherwise cells of every class, as
    validation only serves early stopping.

    Examples
    --------
    >>> y = np.array([0, 1] * 20)
    >>> int(validation_holdout(y, None, 0.1, np.random.default_rng(0)).sum())
    4
    """
    if groups is not None and len(np.unique(groups)) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a poor group split falls back to cells below
            val = group_holdout(y, groups, val_size, rng)
        # With few, large groups one group can be far more than the validation share; then
        # it would starve training, and validation (early stopping only) takes cells instead.
        if val.mean() <= 2 * val_size and _keeps_every_class(y, val):
            return val
    return stratified_holdout(y, val_size, rng)


def cv_splits(
    y: np.ndarray,
    groups: np.ndarray | None,
    n_splits: int,
    *,
    val_size: float = 0.1,
    random_state: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Deal cells into ``n_splits`` test folds, and choose each split's validation cells.

    With ``groups``, whole groups go to each fold (scikit-learn's ``StratifiedGroupKFold``,
    shuffled: groups are dealt so that each fold's class mix is close to the overall one), so
    no group is ever in a fold's test part and its training part; otherwise each class is
    spread evenly over the folds (``StratifiedKFold``). In split ``i``, fold ``i`` is the test
    part and the validation part is :func:`validation_holdout` of the other folds.

    Parameters
    ----------
    y
        Integer class of each cell.
    groups
        Optional group (donor, patient, sample) of each cell.
    n_splits
        Number of folds, at least 2.
    val_size
        Share of each split's non-test cells used for validation, in [0, 1).
    random_state
        Seed.

    Returns
    -------
    ``(fold, val)``: the test fold of each cell, and a ``(n_splits, cells)`` mask of the
    validation cells of each split.

    Examples
    --------
    >>> y = np.array([0, 1] * 30)
    >>> groups = np.repeat(np.arange(6), 10)
    >>> fold, val = cv_splits(y, groups, 3)
    >>> all(len(set(groups[fold == f]) & set(groups[fold != f])) == 0 for f in range(3))
    True
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    val_size = check_fraction("val_size", val_size, allow_zero=True)
    y = np.asarray(y, dtype=np.int64)
    seed = None if random_state is None else int(random_state) % 2**32
    if groups is None:
        folds = StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(y, y)
    else:
        groups = np.asarray(groups)
        n_groups = len(np.unique(groups))
        if n_groups < n_splits:
            raise ValueError(
                f"n_splits={n_splits} splits by group need at least {n_splits} groups, but "
                f"there are {n_groups}; lower n_splits or split cells (group_key=None)."
            )
        kfold = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # It warns when a class has fewer groups than splits; some folds then lack that
            # class, which the per-split scores show.
            warnings.simplefilter("ignore", UserWarning)
            folds = list(kfold.split(y, y, groups))
    fold = np.empty(len(y), dtype=np.int64)
    for index, (_, test) in enumerate(folds):
        fold[test] = index
    rng = np.random.default_rng(random_state)
    val = np.zeros((n_splits, len(y)), dtype=bool)
    for index in range(n_splits):
        rest = np.flatnonzero(fold != index)
        if val_size > 0:
            held = validation_holdout(
                y[rest], None if groups is None else groups[rest], val_size, rng
            )
            val[index, rest[held]] = True
    return fold, val


def gene_folds(y: np.ndarray, n_folds: int, random_state: int | None = 0) -> np.ndarray:
    """Deal genes into ``n_folds`` folds, each class spread evenly over the folds.

    Examples
    --------
    >>> folds = gene_folds(np.array([0] * 6 + [1] * 4), 2)
    >>> sorted(np.bincount(folds).tolist())
    [5, 5]
    """
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    folds = np.empty(len(y), dtype=np.int64)
    offset = 0
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        # Continue the round-robin where the previous class stopped, so fold sizes stay even.
        folds[members] = (offset + np.arange(len(members))) % n_folds
        offset += len(members)
    return folds
