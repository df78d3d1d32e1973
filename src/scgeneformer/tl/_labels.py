"""Labels and groups for fine-tuning: checked, encoded, weighted."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._slots import positions_of, var_tokens
from ..model import Geneformer


def obs_column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise ValueError(
            f"{what}={key!r} is not a column of adata.obs; the columns are "
            f"{list(adata.obs.columns)}."
        )
    return adata.obs[key]


def encode_labels(values: pd.Series, where: str, fix: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and class names (categorical order if any, else sorted)."""
    missing = int(values.isna().sum())
    if missing:
        raise ValueError(f"{where} has {missing:,} missing labels (NaN) of {len(values):,}; {fix}.")
    categorical = values.astype("category").cat.remove_unused_categories()
    classes = [str(c) for c in categorical.cat.categories]
    if len(classes) < 2:
        held = f"one class only ({classes[0]!r})" if classes else "no labels"
        raise ValueError(f"{where} holds {held}; a classifier needs at least two classes.")
    return categorical.cat.codes.to_numpy().astype(np.int64), classes


def check_class_sizes(
    codes: np.ndarray, classes: list[str], where: str, minimum: int, reason: str
) -> None:
    counts = np.bincount(codes, minlength=len(classes))
    small = {classes[i]: int(counts[i]) for i in np.flatnonzero(counts < minimum)}
    if small:
        raise ValueError(
            f"In {where}, class(es) {small} have fewer than {minimum} members (count shown); "
            f"each class needs at least {minimum} {reason}. Drop or merge those classes."
        )


def cell_groups(adata: AnnData, group_key: str | None) -> np.ndarray | None:
    if group_key is None:
        return None
    values = obs_column(adata, group_key, "group_key")
    missing = int(values.isna().sum())
    if missing:
        raise ValueError(
            f"obs[{group_key!r}] has {missing:,} cells without a group (NaN); fill or drop them."
        )
    groups = values.astype(str).to_numpy()
    unique = np.unique(groups)
    if len(unique) < 2:
        raise ValueError(
            f"group_key={group_key!r} has a single group ({unique[0]!r}); splitting by group "
            "needs at least two. Use group_key=None for a stratified split of cells."
        )
    return groups


def class_weights(targets: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Balanced weights ``n / (n_classes * n_c)`` (scikit-learn's), 0 for absent classes."""
    if class_weight is None:
        return np.ones(n_classes, dtype=np.float32)
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = np.divide(
        counts.sum(), n_classes * counts, out=np.zeros_like(counts), where=counts > 0
    )
    return weights.astype(np.float32)


def gene_label_table(
    adata: AnnData,
    model: Geneformer,
    label_key: str,
    gene_labels: Mapping[str, Any] | pd.Series | None,
) -> tuple[pd.DataFrame, list[str]]:
    """Labelled genes as a table (name, token, code), checked; and the class names."""
    if gene_labels is None:
        if label_key not in adata.var.columns:
            raise ValueError(
                "task='gene' needs gene_labels=, a mapping gene -> class, or labels in "
                f"adata.var[{label_key!r}]; var has the columns {list(adata.var.columns)}."
            )
        column = adata.var[label_key]
        labels = column[column.notna()]
        where = f"var[{label_key!r}]"
    else:
        labels = pd.Series(dict(gene_labels), dtype=object)
        where = "gene_labels"
    if labels.empty:
        raise ValueError(f"{where} labels no gene.")
    names = labels.index.astype(str)
    at, in_var = positions_of(adata.var_names.to_numpy(), names.to_numpy())
    token = np.where(in_var, var_tokens(adata)[at], -1)
    unresolved = ~in_var
    if unresolved.any():
        token[unresolved] = model.vocab.tokens_for(names[unresolved])
    unknown = names[token < 0]
    if len(unknown) == len(names):
        raise ValueError(
            f"None of the {len(names):,} genes in {where} is in adata.var_names (as a "
            f"vocabulary gene) or in the vocabulary {model.vocab.name!r}, e.g. "
            f"{list(unknown[:3])}."
        )
    if len(unknown):
        warnings.warn(
            f"{len(unknown):,} of {len(names):,} labelled genes are not in the vocabulary "
            f"{model.vocab.name!r} and are left out, e.g. {list(unknown[:3])}.",
            UserWarning,
            stacklevel=4,
        )
    table = pd.DataFrame({"gene": names, "token": token, "label": labels.array})
    table = table[table["token"] >= 0].drop_duplicates(["token", "label"])
    clash = table["token"].duplicated(keep=False)
    if clash.any():
        raise ValueError(
            f"Genes {table.loc[clash, 'gene'].tolist()[:6]} in {where} name the same vocabulary "
            "gene with different labels."
        )
    codes, classes = encode_labels(
        table["label"].reset_index(drop=True), where, "leave those genes out of the labels"
    )
    table = table.assign(code=codes).reset_index(drop=True)
    return table, classes
