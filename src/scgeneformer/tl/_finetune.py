"""``tl.finetune``: a Geneformer fine-tuned to classify cells or genes.

The cell task lives in :mod:`._finetune_cells`, the gene task in :mod:`._finetune_genes`,
labels in :mod:`._labels`, prediction in :mod:`._predict` and the loop in
:mod:`scgeneformer.train._finetune_loop`; this module checks the arguments and dispatches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pandas as pd
import torch
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._settings import settings
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier, check_freeze_layers
from ..train._finetune_loop import FitOptions
from ..train._optim import resolve_device_dtype
from ._finetune_cells import finetune_cells
from ._finetune_genes import finetune_genes
from ._model_arg import encoder_of
from ._splits import check_fraction

# A backward pass keeps every layer's activations, so training batches take a quarter of the
# token budget that inference uses.
_TRAIN_BUDGET_SHARE = 4


def _check_training_args(
    model: Geneformer,
    *,
    task: str,
    freeze_layers: int,
    epochs: int,
    lr: float,
    class_weight: str | None,
    early_stopping_patience: int | None,
    n_folds: int,
    test_size: float,
    val_size: float,
) -> None:
    if task not in ("cell", "gene"):
        raise ValueError(f"task must be 'cell' or 'gene', got {task!r}.")
    if not isinstance(model, Geneformer):
        raise TypeError(f"model must be a sgf.Geneformer, got {type(model).__name__}.")
    check_freeze_layers(freeze_layers, model.num_layers)
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
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


@renamed_keywords(batch_tokens="token_budget")
def finetune(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    label_key: str,
    task: Literal["cell", "gene"] = "cell",
    group_key: str | None = None,
    test_size: float = 0.2,
    val_size: float = 0.1,
    freeze_layers: int = 0,
    epochs: int = 10,
    lr: float = 5e-5,
    weight_decay: float = 0.001,
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
        Cells: the ``obs`` column of labels. Genes: the name of the results (and the ``var``
        column of labels when ``gene_labels`` is None).
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
        Peak learning rate.
    weight_decay
        AdamW weight decay on weight matrices.
    token_budget
        Tokens per training batch (default a quarter of ``sgf.settings.token_budget``);
        evaluation batches take four times as many.
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
        ``accuracy``, ``macro_f1``, ``confusion_matrix`` (``{"labels", "counts"}``, rows the
        true classes) on the test cells; ``baseline`` (the same for PCA + logistic
        regression); ``n_cells`` per part; ``groups`` per part (with ``group_key``);
        ``history``; ``classes``; ``params``.

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
    >>> clf = sgf.tl.finetune(adata, model, label_key="state", group_key="donor", epochs=2)
    >>> adata.uns["state_finetune"]["macro_f1"]  # doctest: +SKIP
    0.93
    >>> sgf.pl.confusion_matrix(adata, "state")  # doctest: +SKIP
    """
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
        test_size=test_size,
        val_size=val_size,
    )
    key = key_added or label_key
    device_, dtype_ = resolve_device_dtype(device, dtype)
    train_budget = (
        settings.token_budget // _TRAIN_BUDGET_SHARE if token_budget is None else int(token_budget)
    )
    options = FitOptions(
        freeze_layers=int(freeze_layers),
        epochs=int(epochs),
        lr=float(lr),
        weight_decay=float(weight_decay),
        train_budget=train_budget,
        eval_budget=train_budget * _TRAIN_BUDGET_SHARE,
        class_weight=class_weight,
        random_state=int(random_state),
        device=device_,
        dtype=dtype_,
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
