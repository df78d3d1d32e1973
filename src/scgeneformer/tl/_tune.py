"""``tl.tune_finetune``: an Optuna search of fine-tuning settings on validation macro-F1."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from anndata import AnnData

from ..model import Geneformer
from ..model._classifier import GeneformerClassifier
from ..model._lora import lora_options
from ._finetune import _check_training_args, finetune, fitting_options
from ._finetune_cells import cell_inputs, train_cells
from ._splits import split_cells

logger = logging.getLogger(__name__)

SearchSpace = Mapping[str, tuple | Sequence[Any]]
SEARCH_KEYS = ("lr", "warmup_fraction", "weight_decay", "epochs", "freeze_layers")
_FIXED_DEFAULTS: dict[str, Any] = {
    "lr": "auto",
    "warmup_fraction": 0.1,
    "weight_decay": 0.001,
    "epochs": 10,
    "freeze_layers": 0,
}


def default_search_space(num_layers: int) -> dict[str, tuple | list]:
    """Return the search used when none is given, for an encoder of ``num_layers`` layers.

    Examples
    --------
    >>> default_search_space(6)["freeze_layers"]
    [0, 1, 2, 3]
    """
    return {
        "lr": (1e-5, 1e-2, "log"),
        "warmup_fraction": (0.0, 0.3),
        "weight_decay": (1e-4, 1e-1, "log"),
        "epochs": (3, 15),
        "freeze_layers": list(range(num_layers // 2 + 1)),
    }


def _check_search_space(space: SearchSpace, num_layers: int) -> dict[str, tuple | list]:
    unknown = sorted(set(space) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(
            f"search_space has unknown key(s) {unknown}; it can search {list(SEARCH_KEYS)}."
        )
    if not space:
        raise ValueError(f"search_space is empty; give at least one of {list(SEARCH_KEYS)}.")
    checked: dict[str, tuple | list] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"search_space[{name!r}] lists no values.")
            checked[name] = list(spec)
            continue
        log = len(spec) == 3 and spec[2] == "log"
        if not isinstance(spec, tuple) or len(spec) not in (2, 3) or (len(spec) == 3 and not log):
            raise ValueError(
                f"search_space[{name!r}] must be (low, high), (low, high, 'log') or a list of "
                f"values, got {spec!r}."
            )
        low, high = spec[0], spec[1]
        if not low < high or (log and low <= 0):
            raise ValueError(f"search_space[{name!r}] needs 0 < low < high, got {spec!r}.")
        checked[name] = tuple(spec)
    layers = checked.get("freeze_layers")
    highest = max(layers) if isinstance(layers, list) else layers[1] if layers else 0
    if highest > num_layers:
        raise ValueError(
            f"search_space['freeze_layers'] reaches {highest}, but the model has {num_layers} "
            "layers."
        )
    return checked


def _suggest(trial: Any, name: str, spec: tuple | list) -> Any:
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    low, high = spec[0], spec[1]
    log = len(spec) == 3
    if name in ("epochs", "freeze_layers"):
        return trial.suggest_int(name, int(low), int(high), log=log)
    return trial.suggest_float(name, float(low), float(high), log=log)


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise ImportError(
            "sgf.tl.tune_finetune needs Optuna: pip install 'scgeneformer[tune]' (or "
            "pip install optuna)."
        ) from err
    return optuna


def tune_finetune(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    group_key: str | None = None,
    search_space: SearchSpace | None = None,
    n_trials: int = 20,
    timeout: float | None = None,
    test_size: float = 0.2,
    val_size: float = 0.2,
    pruning: bool = True,
    random_state: int = 0,
    key_added: str | None = None,
    **finetune_kwargs: Any,
) -> GeneformerClassifier:
    """Search fine-tuning settings with Optuna, then fine-tune with the best and return it.

    The cells are split once, as :func:`finetune` splits them (by ``group_key`` when given):
    every trial trains on the training part with its settings (and the same seed) and is
    scored by its best validation macro-F1 over the epochs; the test part is never seen by the
    search. Trials are proposed by Optuna's TPE sampler seeded with ``random_state``, and with
    ``pruning`` a trial whose validation macro-F1 after an epoch falls below the median of
    earlier trials at that epoch is stopped (Optuna's median pruner, after five complete
    trials). The best trial's settings are then passed to :func:`finetune` on the same
    split, which trains the returned classifier (equal to the best trial's on the same
    device), scores it on the test cells beside the baseline and writes its usual slots.

    Parameters
    ----------
    adata
        Cells with raw counts and labels.
    model
        The pretrained :class:`~scgeneformer.Geneformer`; never changed.
    label_key
        ``obs`` column of the labels.
    group_key
        ``obs`` column of groups (donors) to split by.
    search_space
        Settings to search, by name: ``lr``, ``warmup_fraction``, ``weight_decay``,
        ``epochs``, ``freeze_layers``. Each is ``(low, high)`` (uniform; integers for epochs
        and frozen layers), ``(low, high, "log")`` (log-uniform) or a list of values. Default
        :func:`~scgeneformer.tl._tune.default_search_space`: lr 1e-5-1e-2 (log), warm-up
        0-0.3, weight decay 1e-4-0.1 (log), 3-15 epochs, 0 to half the layers frozen.
        Settings not searched take ``finetune_kwargs`` or :func:`finetune`'s defaults.
    n_trials
        Trials at most.
    timeout
        Seconds after which no new trial starts (None: no limit).
    test_size, val_size
        As in :func:`finetune`; the validation part scores the trials, so it is larger by
        default (0.2 of the non-test cells).
    pruning
        Stop unpromising trials early.
    random_state
        Seed of the split, the sampler and every trial's training.
    key_added
        Prefix of the result slots; default ``label_key``.
    **finetune_kwargs
        Passed to every trial and to the final :func:`finetune` (e.g. ``token_budget``,
        ``class_weight``, ``early_stopping_patience``, ``device``).

    Returns
    -------
    The classifier fine-tuned with the best settings. Writes what :func:`finetune` writes,
    and ``uns[f"{key}_tune"]``: ``trials`` (a table as a dict of lists: ``number``,
    ``state`` (complete or pruned), ``value`` (best validation macro-F1; NaN when pruned),
    ``epochs_run`` and each searched setting), ``best_params``, ``best_value``,
    ``best_trial``, ``search_space`` (as text), ``n_trials``, ``metric``.

    Examples
    --------
    >>> clf = sgf.tl.tune_finetune(adata, model, label_key="state", group_key="donor",
    ...                            n_trials=10)  # doctest: +SKIP
    >>> adata.uns["state_tune"]["best_params"]  # doctest: +SKIP
    >>> sgf.pl.tune_trials(adata, "state")  # doctest: +SKIP
    """
    if not isinstance(label_key, str):  # a list is multitask fine-tuning, which is not searched
        raise TypeError(
            f"tune_finetune searches on one label column, got label_key={label_key!r}; tune on "
            "one column, or fine-tune several with sgf.tl.finetune(label_key=[...])."
        )
    optuna = _require_optuna()
    space, fixed, rest = _tuning_arguments(
        model, search_space, n_trials, test_size, val_size, finetune_kwargs
    )
    patience = rest.get("early_stopping_patience", 3)
    fit_args = {
        "token_budget": rest.get("token_budget"),
        "class_weight": rest.get("class_weight", "balanced"),
        "device": rest.get("device"),
        "dtype": rest.get("dtype"),
        "random_state": random_state,
        # Trials train as the final fit will: with the same adapter, if any.
        "adapter": lora_options(rest.get("adapter"), rest.get("adapter_options")),
        "quantize": rest.get("quantize"),
    }
    codes, classes, groups, tokens, n_tokens, usable = cell_inputs(
        adata, model, label_key, group_key
    )
    split = split_cells(
        codes[usable],
        None if groups is None else groups[usable],
        test_size=test_size,
        val_size=val_size,
        random_state=random_state,
    )
    train, val = usable[split == "train"], usable[split == "val"]

    def objective(trial: Any) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        options = fitting_options(**{**fixed, **params}, **fit_args)

        def report(epoch: int, score: float) -> None:
            trial.report(score, epoch)
            if pruning and trial.should_prune():
                raise optuna.TrialPruned()

        _, history = train_cells(
            model,
            tokens,
            n_tokens,
            codes,
            classes,
            train,
            val,
            options,
            label_key=label_key,
            patience=patience,
            desc=f"trial {trial.number}",
            on_epoch=report,
        )
        trial.set_user_attr("epochs_run", len(history["train"]))
        return float(max(record["macro_f1"] for record in history["eval"]))

    study = _run_study(optuna, objective, n_trials, timeout, random_state)
    best = study.best_trial
    logger.info(
        f"tune_finetune: best validation macro-F1 {best.value:.3f} in trial {best.number} of "
        f"{len(study.trials)} ({_n_complete(study)} complete), with {best.params}."
    )
    key = key_added or label_key
    clf = finetune(
        adata,
        model,
        label_key=label_key,
        group_key=group_key,
        test_size=test_size,
        val_size=val_size,
        random_state=random_state,
        key_added=key,
        **{**fixed, **best.params},
        **rest,
    )
    adata.uns[f"{key}_tune"] = {
        "metric": "validation macro-F1",
        "trials": _trials_table(study, space),
        "best_trial": int(best.number),
        "best_value": float(best.value),
        "best_params": dict(best.params),
        "search_space": {name: repr(spec) for name, spec in space.items()},
        "n_trials": len(study.trials),
    }
    clf.training_args["tuned"] = {"best_trial": int(best.number), **best.params}
    return clf


def _tuning_arguments(
    model: Geneformer,
    search_space: SearchSpace | None,
    n_trials: int,
    test_size: float,
    val_size: float,
    finetune_kwargs: dict[str, Any],
) -> tuple[dict[str, tuple | list], dict[str, Any], dict[str, Any]]:
    """Check the search's arguments before any work.

    Returns the checked search space, the fixed settings of every trial (defaults and those
    given) and the other keyword arguments for :func:`finetune`.
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a whole number of at least 1, got {n_trials!r}.")
    forbidden = sorted(set(finetune_kwargs) & {"task", "n_splits", "key_added", "baseline"})
    if forbidden:
        raise ValueError(f"tune_finetune tunes cell classifiers; do not pass {forbidden}.")
    space = _check_search_space(
        default_search_space(model.num_layers) if search_space is None else search_space,
        model.num_layers,
    )
    clash = sorted(set(space) & set(finetune_kwargs))
    if clash:
        raise ValueError(
            f"{clash} are both searched and fixed; leave them out of search_space or of the "
            "keyword arguments."
        )
    fixed = {**_FIXED_DEFAULTS, **{k: v for k, v in finetune_kwargs.items() if k in SEARCH_KEYS}}
    rest = {k: v for k, v in finetune_kwargs.items() if k not in SEARCH_KEYS}
    _check_training_args(
        model,
        task="cell",
        freeze_layers=fixed["freeze_layers"],
        epochs=fixed["epochs"],
        lr=fixed["lr"],
        class_weight=rest.get("class_weight", "balanced"),
        early_stopping_patience=rest.get("early_stopping_patience", 3),
        n_folds=5,
        n_splits=1,
        test_size=test_size,
        val_size=val_size,
        warmup_fraction=fixed["warmup_fraction"],
    )
    if not val_size > 0:
        raise ValueError("tune_finetune scores trials on validation cells; val_size must be > 0.")
    return space, fixed, rest


def _run_study(
    optuna: Any, objective: Any, n_trials: int, timeout: float | None, random_state: int
) -> Any:
    """Run a seeded TPE study with median pruning, with Optuna's per-trial log lines off."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=random_state),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        )
        study.optimize(objective, n_trials=n_trials, timeout=timeout)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if not _n_complete(study):
        raise RuntimeError("No trial of the search completed; raise n_trials or timeout.")
    return study


def _n_complete(study: Any) -> int:
    return sum(t.state.name == "COMPLETE" for t in study.trials)


def _trials_table(study: Any, space: dict[str, tuple | list]) -> dict[str, list[Any]]:
    """Every trial of ``study`` as a dict of columns, one per searched setting among them."""
    trials: dict[str, list[Any]] = {
        "number": [t.number for t in study.trials],
        "state": [t.state.name.lower() for t in study.trials],
        "value": [np.nan if t.value is None else float(t.value) for t in study.trials],
        "epochs_run": [
            int(t.user_attrs.get("epochs_run", len(t.intermediate_values))) for t in study.trials
        ],
    }
    for name in space:
        trials[name] = [t.params[name] for t in study.trials]
    return trials
