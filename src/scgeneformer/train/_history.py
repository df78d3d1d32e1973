"""One history format for every trained thing: ``{"train": [records], "eval": [records]}``.

A record is a dict with at least ``step`` (optimizer steps so far). Pretraining logs
``loss``, ``lr``, ``tokens_per_s`` every few steps and evaluates held-out masked-gene
``accuracy``; fine-tuning logs one training record per epoch (``epoch``, ``step``, ``loss``,
and ``fold`` for the gene task) and one evaluation record per validated epoch (``loss``,
``macro_f1``). :func:`scgeneformer.pl.loss_curve` reads them all.

In ``adata.uns`` (which h5ad files must be able to hold) the same records are stored as one
:class:`~pandas.DataFrame` per part (:func:`history_frames`); :func:`as_history` reads either.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import torch

from ._distributed import Distributed

Records = list[dict[str, Any]]

#: The score an evaluation record holds, and its name in words.
EVAL_SCORES = {"accuracy": "held-out masked-gene accuracy", "macro_f1": "validation macro-F1"}


def empty_history() -> dict[str, Records]:
    """Start a history with no record yet."""
    return {"train": [], "eval": []}


def merge_histories(histories: Iterable[Mapping[str, Records]]) -> dict[str, Records]:
    """Concatenate histories (e.g. the folds of the gene task), in order."""
    merged = empty_history()
    for history in histories:
        for part in merged:
            merged[part] += list(history.get(part, []))
    return merged


def tag_records(history: Mapping[str, Records], **tags: Any) -> dict[str, Records]:
    """Tag every record with ``tags`` (e.g. the fold or split it was trained in).

    Examples
    --------
    >>> tag_records({"train": [{"step": 1}], "eval": []}, fold=0)["train"]
    [{'fold': 0, 'step': 1}]
    """
    return {part: [{**tags, **r} for r in records] for part, records in history.items()}


def history_frames(history: Mapping[str, Records]) -> dict[str, pd.DataFrame]:
    """Turn the history into one table per part, for ``adata.uns``."""
    return {
        part: pd.DataFrame.from_records(list(history.get(part, []))) for part in ("train", "eval")
    }


def as_history(data: Mapping[str, Any]) -> dict[str, Records]:
    """Read a history: records, tables (:func:`history_frames`), or per-epoch lists.

    The per-epoch lists are what fine-tuning stored before version 0.2.

    Examples
    --------
    >>> as_history({"epoch": [1], "step": [4], "loss": [0.5], "val_macro_f1": [0.9]})["eval"]
    [{'epoch': 1, 'step': 4, 'macro_f1': 0.9}]
    """
    if "train" in data or "eval" in data or not data:
        return {part: _records(data.get(part, [])) for part in ("train", "eval")}
    rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    kept = ("fold", "epoch", "step")
    train = [{k: r[k] for k in (*kept, "loss") if k in r} for r in rows]
    evaluation = [
        {
            **{k: r[k] for k in kept if k in r},
            **({"loss": r["val_loss"]} if "val_loss" in r else {}),
            "macro_f1": r["val_macro_f1"],
        }
        for r in rows
        if r.get("val_macro_f1") == r.get("val_macro_f1") and "val_macro_f1" in r
    ]
    return {"train": train, "eval": evaluation}


def _records(part: Records | pd.DataFrame) -> Records:
    if isinstance(part, pd.DataFrame):
        return [
            {k: v.item() if hasattr(v, "item") else v for k, v in row.items() if v == v}
            for row in part.to_dict("records")
        ]
    return list(part)


class LossInterval:
    """Masked-gene loss and throughput sums between two log lines of pretraining."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ce: torch.Tensor | float = 0.0
        self.n_masked = 0
        self.n_tokens = 0
        self.start = time.perf_counter()

    def add(self, ce: torch.Tensor, n_masked: int, n_tokens: int) -> None:
        self.ce = self.ce + ce.detach()
        self.n_masked += n_masked
        self.n_tokens += n_tokens

    def flush(self, ctx: Distributed) -> tuple[float, float]:
        """Global mean loss and tokens/s since the last flush (a collective)."""
        ce = float(self.ce) if isinstance(self.ce, float) else float(self.ce.item())
        total = ctx.all_reduce_sum([ce, self.n_masked, self.n_tokens])
        seconds = max(time.perf_counter() - self.start, 1e-9)
        loss = float(total[0] / max(total[1], 1))
        self.reset()
        return loss, float(total[2]) / seconds
