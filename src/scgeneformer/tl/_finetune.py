"""``tl.finetune``: a Geneformer fine-tuned to classify cells or genes.

The cell task lives in :mod:`._finetune_cells`, the gene task in :mod:`._finetune_genes`,
labels in :mod:`._labels`, prediction in :mod:`._predict` and the loop in
:mod:`scgeneformer.train._finetune_loop`; this module checks the arguments and dispatches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._settings import settings
from .._slots import check_key_added
from ..data._batching import check_token_budget
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier, check_freeze_layers
from ..model._lora import LoraOptions, lora_options, target_names
from ..model._quantize import check_quantize
from ..train._finetune_loop import TRAIN_BUDGET_SHARE, FitOptions
from ..train._optim import resolve_device_dtype
from ._finetune_cells import finetune_cells
from ._finetune_genes import finetune_genes
from ._model_arg import encoder_of
from ._predict import prediction_slots
from ._splits import check_fraction
from ._task_labels import check_label_columns, check_task_weights


def _check_training_args(
    model: Geneformer,
    *,
    task: str,
    freeze_layers: int,
    epochs: int,
    lr: float | str,
    class_weight: str | None,
    early_stopping_patience: int | None,
    n_folds: int,
    n_splits: int,
    test_size: float,
    val_size: float,
    warmup_fraction: float = 0.1,
) -> None:
    if task not in ("cell", "gene"):
        raise ValueError(f"task must be 'cell' or 'gene', got {task!r}.")
    if not isinstance(model, Geneformer):
        raise TypeError(f"model must be a sgf.Geneformer, got {type(model).__name__}.")
    check_freeze_layers(freeze_layers, model.num_layers)
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if lr != "auto" and not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"lr must be 'auto' or a positive number, got {lr!r}.")
    if class_weight not in ("balanced", None):
        raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}.")
    if early_stopping_patience is not None and int(early_stopping_patience) < 1:
        raise ValueError(
            f"early_stopping_patience must be at least 1 or None, got {early_stopping_patience}."
        )
    if task == "gene" and (isinstance(n_folds, bool) or int(n_folds) < 2):
        raise ValueError(f"n_folds must be at least 2, got {n_folds!r}.")
    check_fraction("test_size", test_size)
    check_fraction("val_size", val_size, allow_zero=True)
    check_fraction("warmup_fraction", warmup_fraction, allow_zero=True)
    if isinstance(n_splits, bool) or not isinstance(n_splits, int | np.integer) or n_splits < 1:
        raise ValueError(f"n_splits must be a whole number of at least 1, got {n_splits!r}.")
    if task == "gene" and n_splits > 1:
        raise ValueError(
            "n_splits is for cells; the gene task is always cross-validated, over n_folds folds."
        )


def fitting_options(
    *,
    freeze_layers: int,
    epochs: int,
    lr: float | Literal["auto"],
    weight_decay: float,
    warmup_fraction: float,
    token_budget: int | None,
    class_weight: str | None,
    random_state: int,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    adapter: LoraOptions | None = None,
    quantize: str | None = None,
) -> FitOptions:
    """Collect the options every fit takes (arguments checked by the caller, but quantize).

    ``quantize`` is checked here, where the device is known: a CPU run is refused before
    any work.
    """
    device_, dtype_ = resolve_device_dtype(device, dtype)
    check_quantize(quantize, device_, adapter)
    return FitOptions(
        freeze_layers=int(freeze_layers),
        epochs=int(epochs),
        lr=lr if lr == "auto" else float(lr),
        weight_decay=float(weight_decay),
        warmup_fraction=float(warmup_fraction),
        train_budget=None if token_budget is None else int(token_budget),
        eval_budget=(
            settings.token_budget
            if token_budget is None
            else int(token_budget) * TRAIN_BUDGET_SHARE
        ),
        class_weight=class_weight,
        random_state=int(random_state),
        device=device_,
        dtype=dtype_,
        adapter=adapter,
        quantize=quantize,
    )


@renamed_keywords(batch_tokens="token_budget")
def finetune(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    label_key: str | Sequence[str],
    task_weights: Literal["size"] | Mapping[str, float] | None = None,
    task: Literal["cell", "gene"] = "cell",
    group_key: str | None = None,
    test_size: float = 0.2,
    val_size: float = 0.1,
    freeze_layers: int = 0,
    epochs: int = 10,
    lr: float | Literal["auto"] = "auto",
    weight_decay: float = 0.001,
    warmup_fraction: float = 0.1,
    token_budget: int | None = None,
    class_weight: Literal["balanced"] | None = "balanced",
    early_stopping_patience: int | None = 3,
    baseline: bool = True,
    random_state: int = 0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    key_added: str | None = None,
    gene_labels: Mapping[str, Any] | pd.Series | None = None,
    n_folds: int = 5,
    n_splits: int = 1,
    adapter: Literal["lora"] | None = None,
    adapter_options: Mapping[str, Any] | LoraOptions | None = None,
    quantize: Literal["4bit", "8bit"] | None = None,
) -> GeneformerClassifier:
    """Fine-tune a Geneformer to classify cells (e.g. cell type, disease state) or genes.

    **Cells** (``task="cell"``): the cells are split into training, validation and test parts;
    by ``group_key`` when given (no donor or patient in both test and training; the test part
    is chosen to have about ``test_size`` of the cells and the overall class mix), else
    stratified by class. A copy of ``model`` with a ``BertForSequenceClassification`` head
    (pooler on the hidden state at position 0, then dropout and a linear layer; see
    :class:`~scgeneformer.GeneformerClassifier` for what position 0 is under
    V1 and V2 vocabularies) is trained end to end with class-weighted cross-entropy, AdamW,
    linear warm-up and decay; after each epoch it is scored on the validation part, training
    stops after ``early_stopping_patience`` epochs without a better validation macro-F1, and
    the best epoch is kept. The held-out test cells are then predicted and scored, beside the
    baseline a user would otherwise pick: logistic regression on at most 50 principal
    components of log-normalised counts (normalised to 10,000 per cell, ``log1p``; PCA fitted
    on the training and validation cells only), on the same split.

    **Genes** (``task="gene"``): labelled genes (``gene_labels``, or the non-missing entries of
    ``var[label_key]``) are dealt into ``n_folds`` folds, stratified by class. For each fold a
    copy of ``model`` with a ``BertForTokenClassification`` head (dropout and a linear layer on
    every token's last hidden state) is trained on the tokens of the other folds' genes, in
    every cell holding them (the loss ignores all other tokens), for ``epochs`` epochs (no
    early stopping: the held-out genes are the test). Each held-out gene's class probabilities
    are averaged over all the cells it occurs in. A final classifier trained on all labelled
    genes is returned.

    **Several label columns** (``label_key=["cell_type", "disease"]``, cells only): one
    encoder and pooler, one linear head per column (of the shape a single column's head
    has); the loss is the ``task_weights``-weighted sum of each column's cross-entropy (class
    weighted per column with ``class_weight="balanced"``) over the cells labelled in that
    column: a missing label (NaN, None, a missing category) leaves the cell out of that
    column's loss only, and cells labelled in no column are left out, with a warning. The
    split is made once for all columns, stratified by the first column (its unlabelled cells
    as one more class) or by ``group_key``; early stopping follows the mean over columns of
    the validation macro-F1. With one column in the list the result equals the single-column
    fine-tuning bit for bit. ``n_splits`` must be 1. Each column is scored on its labelled
    test cells, beside its own baseline.

    Cells are tokenized with the model's vocabulary first when ``obsm["geneformer_tokens"]``
    is absent; tokens made with another vocabulary are refused. Cells without tokens are left
    out, with a warning. ``model`` itself is never changed.

    Parameters
    ----------
    adata
        Cells by genes: raw counts (for tokens and the baseline) and labels.
    model
        The pretrained :class:`~scgeneformer.Geneformer` to start from (or a classifier,
        whose encoder is the start).
    label_key
        Cells: the ``obs`` column of labels, or a list of columns (multitask: one encoder,
        one head per column, see below). Genes: the name of the results (and the ``var``
        column of labels when ``gene_labels`` is None).
    task_weights
        Multitask only: the weight of each column's loss. None weighs them alike; ``"size"``
        by the number of training cells labelled in each column; a mapping column -> weight
        as given. Weights are rescaled to sum to 1.
    task
        ``"cell"`` or ``"gene"``.
    group_key
        ``obs`` column of groups (donor, patient, sample) to split cells by. The validation
        part is made of whole groups too when some fit its size, else of cells of the
        training groups (it only decides when to stop).
    test_size
        Share of cells held out for testing.
    val_size
        Share of the remaining cells used for validation (early stopping); 0 trains for
        ``epochs`` epochs on all of them.
    freeze_layers
        Number of the encoder's first transformer layers not trained, as in Geneformer (which
        freezes ``bert.encoder.layer[:freeze_layers]``, not the embeddings).
    epochs
        Training epochs at most (per fold for genes).
    lr
        Peak learning rate, or ``"auto"`` (default): a learning-rate range test (Smith 2017)
        on a copy of the weights, 64 steps on the training cells with rates rising from 1e-6
        to 0.1, picks a tenth of the rate at the lowest smoothed training loss (recorded as
        ``peak_lr`` in the history's training records). Geneformer fine-tunes its large
        pretrained models at 5e-5, which leaves small or briefly pretrained models at chance
        level; pass ``lr=5e-5`` to fine-tune as it does. For the gene task ``"auto"`` is
        1e-3, without a range test: a token classifier fits the labelled genes by their own
        embeddings at any rate, so the test's loss falls everywhere and it picks rates at which
        unseen genes are classed worse than chance (``bench/RESULTS.md``).
    weight_decay
        AdamW weight decay on weight matrices.
    warmup_fraction
        Share of the optimiser steps over which the learning rate rises linearly to ``lr``
        (it then falls linearly to 0), in [0, 1).
    token_budget
        Tokens per training batch. Default: sized from the data so that an epoch takes about
        32 optimiser steps (a 32nd of the training cells' tokens), at most a quarter of
        ``sgf.settings.token_budget`` and at least the longest cell; recorded as
        ``token_budget`` in the history's training records. Evaluation batches take four
        times ``token_budget``, or ``sgf.settings.token_budget`` by default.
    class_weight
        ``"balanced"`` weighs each class's loss by ``n / (n_classes * n_class)`` over the
        training cells (tokens for genes); None weighs all alike.
    early_stopping_patience
        Epochs without a better validation macro-F1 before stopping (None: never stop early).
    baseline
        Also score the baseline a user would otherwise pick on the same split: PCA +
        logistic regression for cells, co-expression with the labelled genes for genes.
    random_state
        Seed of the split, the head's initial weights, dropout and batch order.
    device, dtype
        Default ``sgf.settings`` ("auto": CUDA with bfloat16 mixed precision when present,
        else CPU float32). On CUDA cells are packed without padding.
    key_added
        Prefix of the result slots; default ``label_key``.
    gene_labels
        Genes only: gene → class, genes named as in ``var_names`` or as vocabulary IDs
        (Ensembl, or names the vocabulary maps).
    n_folds
        Genes only: folds of the cross-validation; every class needs at least this many genes.
    n_splits
        Cells only: 1 (default) trains once on one train/validation/test split. ``k >= 2``
        cross-validates: the cells are dealt into ``k`` test folds (whole groups with
        ``group_key``, scikit-learn's ``StratifiedGroupKFold``; else stratified by class),
        and for each a classifier is trained on the other folds (``val_size`` of them for
        early stopping, chosen as in a single split) and scored on the fold, beside the
        baseline fitted on the same cells; ``test_size`` is then unused. The classifier
        returned is trained afterwards on all cells.
    adapter
        None (default) trains every weight of the copy. ``"lora"`` freezes the encoder
        (embeddings included) and trains low-rank adapters (LoRA, Hu et al. 2021; ``pip
        install 'scgeneformer[lora]'`` for ``peft``) in its layers from ``freeze_layers`` on,
        with the heads: 1.4% of a V1-10M classifier's weights with the default options. Such a
        classifier saves only its adapters and heads (0.57 MB against 41 MB for V1-10M; see
        :meth:`~scgeneformer.GeneformerClassifier.save`), and ``clf.merge_adapter()`` makes it
        a plain one. A LoRA classifier passed as ``model`` restarts from its merged weights.
    adapter_options
        LoRA settings, a mapping or a :class:`~scgeneformer.model.LoraOptions`: ``r``
        (rank, 8), ``alpha`` (scale, 16; the update is ``alpha / r * B @ A``), ``dropout``
        (0.1), ``target_modules`` (default ``("query", "key", "value")``; also
        ``"attention_output"``, ``"intermediate"``, ``"output"``).
    quantize
        With ``adapter="lora"`` on CUDA: hold the frozen layers in ``"4bit"`` (NF4) or
        ``"8bit"`` through bitsandbytes (``pip install 'scgeneformer[quantize]'``), for
        models too large for the GPU's memory otherwise. Refused on the CPU.

    Returns
    -------
    The fine-tuned :class:`~scgeneformer.GeneformerClassifier`, with its
    per-epoch ``history`` (``{"epoch", "step", "loss", "val_loss", "val_macro_f1"}``, lists of
    equal length; :func:`scgeneformer.tl.predict` applies it to new cells). With ``key =
    key_added or label_key``, writes:

    Cells:

    ``obs[f"{key}_pred"]``
        Predicted class of each test cell (categorical); NaN for cells not in the test part.
    ``obsm[f"{key}_proba"]``
        Class probabilities (float32; columns ordered as ``uns[f"{key}_finetune"]["classes"]``);
        NaN rows outside the test part.
    ``obs[f"{key}_split"]``
        ``"train"``, ``"val"`` or ``"test"``; NaN for cells without tokens.
    ``uns[f"{key}_finetune"]``
        ``accuracy``, ``macro_f1``, ``f1_per_class``, ``auroc``, ``confusion_matrix``
        (``{"labels", "counts"}``, rows the true classes) on the test cells; ``baseline``
        (the same for PCA + logistic regression); ``n_cells`` per part; ``groups`` per part
        (with ``group_key``); ``history``; ``classes``; ``params``.

    Cells with ``n_splits=k >= 2``: ``obs[f"{key}_pred"]`` and ``obsm[f"{key}_proba"]`` hold
    every cell's out-of-fold prediction (by the split that tested it), ``obs[f"{key}_fold"]``
    that split (-1: no tokens), and ``uns[f"{key}_finetune"]`` ``splits`` (per split
    ``macro_f1``, ``accuracy``, ``auroc`` and a ``(k, classes)`` ``f1_per_class``), their
    means under the same names and sample SDs as ``macro_f1_sd``, ``accuracy_sd`` and
    ``auroc_sd``, ``pooled`` (the same scores over all out-of-fold predictions) and its
    ``confusion_matrix``, ``n_cells`` (lists per split), ``test_groups`` (with
    ``group_key``), ``history`` (with a ``split`` column) and ``baseline`` (the same summary
    for PCA + logistic regression on the same splits). The AUROC is of the second class with
    two classes, else one-vs-rest macro (NaN in a split lacking a class).

    Cells with ``label_key`` a list: for each column, ``obs[f"{column}_pred"]`` and
    ``obsm[f"{column}_proba"]`` (prefixed ``f"{key_added}_"`` when ``key_added`` is given;
    every test cell is predicted, labelled in that column or not); with ``key = key_added``
    or the columns joined by ``"_"``, ``obs[f"{key}_split"]`` and ``uns[f"{key}_finetune"]``:
    ``tasks`` (per column the single-task summary: ``classes``, ``accuracy``, ``macro_f1``,
    ``f1_per_class``, ``auroc``, ``confusion_matrix``, ``baseline`` and labelled ``n_cells``
    per part), ``task_weights`` (as used, summing to 1), ``macro_f1`` and ``accuracy`` (means
    over the columns), ``n_cells`` (with ``unlabelled``), ``groups``, ``history``,
    ``label_key``, ``params``. The classifier returned is a
    :class:`~scgeneformer.model._multitask.MultitaskClassifier`; it saves as one
    ``BertForSequenceClassification`` folder (the heads side by side, ``"tasks"`` in its
    config) and loads with :meth:`~scgeneformer.GeneformerClassifier.from_pretrained`.

    Genes:

    ``var[f"{key}_pred"]``, ``var[f"{key}_score"]``, ``var[f"{key}_fold"]``
        Out-of-fold predicted class of each labelled gene (NaN for others); its probability
        of the second class with two classes (the positive one), else of the predicted class;
        the fold that held it out (-1 for others).
    ``uns[f"{key}_finetune"]``
        ``folds`` (per fold ``auroc``, ``accuracy``, ``n_genes``), pooled out-of-fold
        ``auroc``, ``accuracy``, ``macro_f1``, ``confusion_matrix``, a per-gene table
        ``genes`` (also for labelled genes absent from ``var``), ``history`` (with a ``fold``
        column; -1 is the final fit), ``classes``, ``params``; ``baseline``: the same folds
        scored by co-expression (each held-out gene's mean correlation with the labelled
        genes of each class), its ``auroc``, ``accuracy`` and per-fold figures.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=300, random_state=0)
    >>> vocab = sgf.Vocabulary.build(adata, max_length=2048)
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> clf = sgf.tl.finetune(adata, model, label_key="state", group_key="donor",
    ...                       epochs=1, lr=1e-3)
    >>> adata.uns["state_finetune"]["macro_f1"]  # doctest: +SKIP
    0.93
    >>> sgf.pl.confusion_matrix(adata, "state")  # doctest: +SKIP
    """
    if isinstance(model, GeneformerClassifier) and model.adapter is not None:
        model = model.merge_adapter()  # a LoRA classifier restarts from its merged weights
    model = encoder_of(model)  # a classifier is fine-tuned again from its encoder
    _check_training_args(
        model,
        task=task,
        freeze_layers=freeze_layers,
        epochs=epochs,
        lr=lr,
        class_weight=class_weight,
        early_stopping_patience=early_stopping_patience,
        n_folds=n_folds,
        n_splits=n_splits,
        test_size=test_size,
        val_size=val_size,
        warmup_fraction=warmup_fraction,
    )
    lora = lora_options(adapter, adapter_options)
    if lora is not None:
        target_names(lora, model.num_layers, freeze_layers)  # refuses adapting no layer
    check_token_budget(token_budget)
    columns = (
        None
        if isinstance(label_key, str)
        else check_label_columns(label_key, task=task, n_splits=n_splits)
    )
    if columns is None and task_weights is not None:
        raise ValueError("task_weights weighs several label columns; label_key is one column.")
    key = key_added or label_key
    if key_added is not None or isinstance(key, str):  # a bad label_key gets its own error
        check_key_added(key, prediction_slots(key, f"{key}_finetune"), tool="tl.finetune")
    options = fitting_options(
        freeze_layers=freeze_layers,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        token_budget=token_budget,
        class_weight=class_weight,
        random_state=random_state,
        device=device,
        dtype=dtype,
        adapter=lora,
        quantize=quantize,
    )
    if columns is not None:
        from ._multitask import finetune_multitask

        return finetune_multitask(
            adata,
            model,
            columns=columns,
            key_added=key_added,
            task_weights=check_task_weights(task_weights, columns),
            group_key=group_key,
            test_size=test_size,
            val_size=val_size,
            patience=early_stopping_patience,
            baseline=baseline,
            options=options,
        )
    if task == "cell" and n_splits > 1:
        from ._cross_validation import cross_validate_cells

        return cross_validate_cells(
            adata,
            model,
            label_key=label_key,
            key=key,
            group_key=group_key,
            n_splits=int(n_splits),
            val_size=val_size,
            patience=early_stopping_patience,
            baseline=baseline,
            options=options,
        )
    if task == "cell":
        return finetune_cells(
            adata,
            model,
            label_key=label_key,
            key=key,
            group_key=group_key,
            test_size=test_size,
            val_size=val_size,
            patience=early_stopping_patience,
            baseline=baseline,
            options=options,
        )
    return finetune_genes(
        adata,
        model,
        label_key=label_key,
        key=key,
        gene_labels=gene_labels,
        n_folds=int(n_folds),
        baseline=baseline,
        options=options,
    )
