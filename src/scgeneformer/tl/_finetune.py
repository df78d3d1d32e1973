"""``tl.finetune`` and ``tl.predict``: cell and gene classification with a Geneformer encoder."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from tqdm.auto import tqdm

from .._settings import settings
from ..data._batching import pack_tokens, restore_order, token_budget_batches
from ..model import Geneformer
from ..model._classifier import GeneformerClassifier, check_freeze_layers
from ..train._optim import (
    adamw,
    autocast,
    linear_warmup_decay,
    resolve_device_dtype,
    seed_everything,
)
from ._baseline import coexpression_baseline, pca_logreg_baseline
from ._inference import inference_on
from ._model_arg import encoder_of
from ._splits import SPLITS, check_fraction, gene_folds, split_cells
from ._tokens import TOKENS_KEY, cell_tokens

logger = logging.getLogger(__name__)

DEFAULT_PREDICT_KEY = "geneformer_class"
_WARMUP_FRACTION = 0.1
_MAX_GRAD_NORM = 1.0  # transformers' Trainer default, which Geneformer fine-tunes with
# A backward pass keeps every layer's activations, so training batches take a quarter of the
# token budget that inference uses.
_TRAIN_BUDGET_SHARE = 4
# As transformers' length-grouped sampler: shuffle, then sort by length within chunks of about
# 50 batches, so batches are both random and low in padding.
_MEGABATCH_BATCHES = 50

_CELLS_REASON = "cells to have one in training and one in testing"

LossFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor], torch.Tensor]
Evaluate = Callable[[], tuple[float, float]]


# ---------------------------------------------------------------------- checks of the input
def _obs_column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise ValueError(
            f"{what}={key!r} is not a column of adata.obs; the columns are "
            f"{list(adata.obs.columns)}."
        )
    return adata.obs[key]


def _encode_labels(values: pd.Series, where: str, fix: str) -> tuple[np.ndarray, list[str]]:
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


def _check_class_sizes(
    codes: np.ndarray, classes: list[str], where: str, minimum: int, reason: str
) -> None:
    counts = np.bincount(codes, minlength=len(classes))
    small = {classes[i]: int(counts[i]) for i in np.flatnonzero(counts < minimum)}
    if small:
        raise ValueError(
            f"In {where}, class(es) {small} have fewer than {minimum} members (count shown); "
            f"each class needs at least {minimum} {reason}. Drop or merge those classes."
        )


def _groups(adata: AnnData, group_key: str | None) -> np.ndarray | None:
    if group_key is None:
        return None
    values = _obs_column(adata, group_key, "group_key")
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


def _class_weights(targets: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Balanced weights ``n / (n_classes * n_c)`` (scikit-learn's), 0 for absent classes."""
    if class_weight is None:
        return np.ones(n_classes, dtype=np.float32)
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    weights = np.divide(
        counts.sum(), n_classes * counts, out=np.zeros_like(counts), where=counts > 0
    )
    return weights.astype(np.float32)


# ---------------------------------------------------------------------- running the model
def _batch_logits(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    rows: np.ndarray,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the cells ``rows`` and their real tokens' ids, flattened in cell order.

    Cell task: ``(cells, n_classes)``; gene task: ``(tokens, n_classes)`` aligned with the ids.
    """
    device = clf.device
    lengths = n_tokens[rows]
    if packed:
        flat, cu, longest = pack_tokens(tokens[rows].astype(np.int64), lengths)
        flat, cu = flat.to(device), cu.to(device)
        return clf(flat, cu_seqlens=cu, max_seqlen=longest), flat
    width = int(lengths.max())
    ids = torch.as_tensor(tokens[rows, :width].astype(np.int64), device=device)
    keep = torch.arange(width, device=device) < torch.as_tensor(lengths, device=device)[:, None]
    logits = clf(ids, keep)
    return (logits[keep] if clf.task == "gene" else logits), ids[keep]


def _cell_proba(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    *,
    budget: int | None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> np.ndarray:
    """Class probabilities per cell in input order; NaN rows for cells without tokens."""
    packed = device.type == "cuda"
    proba = np.full((len(n_tokens), clf.n_classes), np.nan, dtype=np.float32)
    present = np.flatnonzero(n_tokens > 0)
    if not present.size:
        return proba
    batches = token_budget_batches(n_tokens[present], budget, padded=not packed)
    results = []
    bar = tqdm(total=len(present), desc="predict", unit="cells", disable=not progress)
    with inference_on(clf, device), autocast(device, dtype), bar:
        for batch in batches:
            logits, _ = _batch_logits(clf, tokens, n_tokens, present[batch], packed)
            results.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            bar.update(len(batch))
    proba[present] = restore_order(results, batches)
    return proba


def _gene_proba(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    *,
    budget: int | None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Each token id's class probabilities averaged over the cells holding it, and those counts.

    Returns ``(vocab_size, n_classes)`` means (NaN for tokens in no cell) and ``(vocab_size,)``
    cell counts (a gene occurs at most once per cell).
    """
    packed = device.type == "cuda"
    size = len(clf.vocab)
    sums = torch.zeros((size, clf.n_classes), dtype=torch.float64, device=device)
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    present = np.flatnonzero(n_tokens > 0)
    batches = token_budget_batches(n_tokens[present], budget, padded=not packed)
    bar = tqdm(total=len(present), desc="predict genes", unit="cells", disable=not progress)
    with inference_on(clf, device), autocast(device, dtype), bar:
        for batch in batches:
            logits, ids = _batch_logits(clf, tokens, n_tokens, present[batch], packed)
            sums.index_add_(0, ids, torch.softmax(logits.double(), dim=-1))
            counts += torch.bincount(ids, minlength=size)
            bar.update(len(batch))
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means, counts


def _epoch_batches(
    n_tokens: np.ndarray,
    cells: np.ndarray,
    budget: int,
    packed: bool,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One epoch of training batches: random, yet of similar lengths within each batch."""
    order = rng.permutation(cells)
    per_batch = max(1, budget // max(int(np.median(n_tokens[cells])), 1))
    chunk_size = _MEGABATCH_BATCHES * per_batch
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = order[start : start + chunk_size]
        batches += [
            chunk[b] for b in token_budget_batches(n_tokens[chunk], budget, padded=not packed)
        ]
    return [batches[i] for i in rng.permutation(len(batches))]


def _fit(
    clf: GeneformerClassifier,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    budget: int,
    device: torch.device,
    dtype: torch.dtype,
    rng: np.random.Generator,
    evaluate: Evaluate | None,
    patience: int | None,
    desc: str,
) -> dict[str, list[Any]]:
    """Train ``clf`` on ``cells``; keep the epoch with the best validation score if evaluated.

    Returns the history: per epoch ``epoch``, ``step`` (optimizer steps so far) and ``loss``
    (mean training loss), plus ``val_loss`` and ``val_macro_f1`` when ``evaluate`` is given.
    """
    packed = device.type == "cuda"
    clf.to(device)
    optimizer = adamw(clf, lr, weight_decay)
    first = _epoch_batches(n_tokens, cells, budget, packed, rng)
    total_steps = epochs * len(first)
    scheduler = linear_warmup_decay(optimizer, round(_WARMUP_FRACTION * total_steps), total_steps)
    trainable = [p for p in clf.parameters() if p.requires_grad]
    history: dict[str, list[Any]] = {"epoch": [], "step": [], "loss": []}
    if evaluate is not None:
        history.update(val_loss=[], val_macro_f1=[])
    best_score, best_state, stale, step = -np.inf, None, 0, 0
    bar = tqdm(total=total_steps, desc=desc, unit="steps", disable=not settings.progress)
    with bar:
        for epoch in range(1, epochs + 1):
            batches = first if epoch == 1 else _epoch_batches(n_tokens, cells, budget, packed, rng)
            clf.train()
            losses = []
            for batch in batches:
                with autocast(device, dtype):
                    logits, ids = _batch_logits(clf, tokens, n_tokens, batch, packed)
                loss = loss_fn(batch, logits.float(), ids)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, _MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                bar.update()
            history["epoch"].append(epoch)
            history["step"].append(step)
            history["loss"].append(float(np.mean(losses)))
            message = f"{desc} epoch {epoch}: loss {history['loss'][-1]:.4f}"
            if evaluate is not None:
                val_loss, score = evaluate()
                history["val_loss"].append(val_loss)
                history["val_macro_f1"].append(score)
                message += f", validation loss {val_loss:.4f}, macro-F1 {score:.4f}"
                if score > best_score:
                    best_score, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in clf.state_dict().items()}
                else:
                    stale += 1
            logger.info(message)
            if patience is not None and stale >= patience:
                logger.info(f"{desc}: no validation gain in {patience} epochs; stopping early.")
                break
    if best_state is not None:
        clf.load_state_dict(best_state)
    return history


def _new_classifier(
    model: Geneformer,
    classes: list[str],
    *,
    task: Literal["cell", "gene"],
    label_key: str,
    freeze_layers: int,
    random_state: int,
) -> GeneformerClassifier:
    clf = GeneformerClassifier.from_encoder(
        model, classes, task=task, label_key=label_key, random_state=random_state
    )
    clf.freeze_layers(freeze_layers)
    return clf


def _metrics(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
        "confusion": confusion_matrix(truth, pred, labels=np.arange(n_classes)),
    }


# ---------------------------------------------------------------------- public functions
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
    batch_tokens: int | None = None,
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
    batch_tokens
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
        settings.token_budget // _TRAIN_BUDGET_SHARE if batch_tokens is None else int(batch_tokens)
    )
    options = {
        "freeze_layers": int(freeze_layers),
        "epochs": int(epochs),
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "train_budget": train_budget,
        "eval_budget": train_budget * _TRAIN_BUDGET_SHARE,
        "class_weight": class_weight,
        "random_state": int(random_state),
        "device": device_,
        "dtype": dtype_,
    }
    if task == "cell":
        return _finetune_cells(
            adata,
            model,
            label_key=label_key,
            key=key,
            group_key=group_key,
            test_size=test_size,
            val_size=val_size,
            patience=early_stopping_patience,
            baseline=baseline,
            **options,
        )
    return _finetune_genes(
        adata,
        model,
        label_key=label_key,
        key=key,
        gene_labels=gene_labels,
        n_folds=int(n_folds),
        baseline=baseline,
        **options,
    )


def _params(options: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Turn the fitting options into plain values, for ``uns`` and the saved classifier."""
    params = {k: v for k, v in options.items() if k not in ("device", "dtype")}
    params["device"] = str(options["device"])
    params["dtype"] = str(options["dtype"]).removeprefix("torch.")
    return {**params, **extra}


def _finetune_cells(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    key: str,
    group_key: str | None,
    test_size: float,
    val_size: float,
    patience: int | None,
    baseline: bool,
    **options: Any,
) -> GeneformerClassifier:
    where = f"obs[{label_key!r}]"
    codes, classes = _encode_labels(
        _obs_column(adata, label_key, "label_key"),
        where,
        f"drop those cells first, e.g. adata = adata[adata.obs[{label_key!r}].notna()].copy()",
    )
    _check_class_sizes(codes, classes, where, 2, _CELLS_REASON)
    groups = _groups(adata, group_key)
    tokens, n_tokens = cell_tokens(adata, model)
    usable = np.flatnonzero(n_tokens > 0)
    if len(usable) < len(n_tokens):
        warnings.warn(
            f"{len(n_tokens) - len(usable):,} cells have no tokens; they are left out of "
            "training and testing (no split, no prediction).",
            UserWarning,
            stacklevel=3,
        )
        _check_class_sizes(codes[usable], classes, f"{where} (cells with tokens)", 2, _CELLS_REASON)
    split = np.full(len(n_tokens), None, dtype=object)
    split[usable] = split_cells(
        codes[usable],
        None if groups is None else groups[usable],
        test_size=test_size,
        val_size=val_size,
        random_state=options["random_state"],
    )
    part = {name: np.flatnonzero(split == name) for name in SPLITS}
    device, dtype = options["device"], options["dtype"]
    eval_budget = options["eval_budget"]

    seed = options["random_state"]
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    clf = _new_classifier(
        model,
        classes,
        task="cell",
        label_key=label_key,
        freeze_layers=options["freeze_layers"],
        random_state=seed,
    )
    weights = _class_weights(codes[part["train"]], len(classes), options["class_weight"])
    targets = torch.as_tensor(codes, device=device)
    weight_t = torch.as_tensor(weights, device=device)

    def loss_fn(batch: np.ndarray, logits: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets[torch.as_tensor(batch, device=device)], weight_t)

    def evaluate() -> tuple[float, float]:
        from sklearn.metrics import f1_score

        val = part["val"]
        proba = _cell_proba(
            clf,
            tokens[val],
            n_tokens[val],
            budget=eval_budget,
            device=device,
            dtype=dtype,
            progress=False,
        )
        truth = codes[val]
        nll = -np.log(np.clip(proba[np.arange(len(val)), truth], 1e-12, None)).mean()
        macro_f1 = f1_score(truth, proba.argmax(axis=1), average="macro", zero_division=0)
        return float(nll), float(macro_f1)

    history = _fit(
        clf,
        tokens,
        n_tokens,
        part["train"],
        loss_fn,
        epochs=options["epochs"],
        lr=options["lr"],
        weight_decay=options["weight_decay"],
        budget=options["train_budget"],
        device=device,
        dtype=dtype,
        rng=rng,
        evaluate=evaluate if len(part["val"]) else None,
        patience=patience if len(part["val"]) else None,
        desc="finetune",
    )
    test = part["test"]
    test_proba = _cell_proba(
        clf,
        tokens[test],
        n_tokens[test],
        budget=eval_budget,
        device=device,
        dtype=dtype,
        progress=settings.progress,
    )
    scores = _metrics(codes[test], test_proba.argmax(axis=1), len(classes))
    result: dict[str, Any] = {
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "classes": classes,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "confusion_matrix": {"labels": classes, "counts": scores["confusion"]},
        "n_cells": {
            **{name: len(cells) for name, cells in part.items()},
            "without_tokens": len(n_tokens) - len(usable),
        },
        "history": history,
        "params": _params(
            options, test_size=float(test_size), val_size=float(val_size), patience=patience
        ),
    }
    if groups is not None:
        result["groups"] = {name: sorted(set(groups[cells])) for name, cells in part.items()}
    if baseline:
        info = adata.uns.get(TOKENS_KEY, {})
        layer = info.get("layer", "X") if isinstance(info, Mapping) else "X"
        fitted = pca_logreg_baseline(
            adata,
            codes,
            np.concatenate([part["train"], part["val"]]),
            test,
            layer=None if layer == "X" else layer,
            class_weight=options["class_weight"],
            random_state=options["random_state"],
        )
        result["baseline"] = fitted
        logger.info(
            f"finetune: test macro-F1 {scores['macro_f1']:.3f} (accuracy "
            f"{scores['accuracy']:.3f}); PCA + logistic regression {fitted['macro_f1']:.3f} "
            f"({fitted['accuracy']:.3f})."
        )

    proba = np.full((adata.n_obs, len(classes)), np.nan, dtype=np.float32)
    proba[test] = test_proba
    _write_cell_predictions(adata, key, classes, proba)
    adata.obs[f"{key}_split"] = pd.Categorical(split, categories=list(SPLITS))
    adata.uns[f"{key}_finetune"] = result
    clf.history = history
    clf.training_args = {
        **result["params"],
        "task": "cell",
        "label_key": label_key,
        "group_key": group_key,
        "test_accuracy": scores["accuracy"],
        "test_macro_f1": scores["macro_f1"],
    }
    return clf


def _write_cell_predictions(
    adata: AnnData, key: str, classes: list[str], proba: np.ndarray
) -> None:
    """Write ``obs[f"{key}_pred"]`` (NaN where a row is NaN) and ``obsm[f"{key}_proba"]``."""
    known = ~np.isnan(proba).any(axis=1)
    codes = np.where(known, np.nan_to_num(proba).argmax(axis=1), -1)
    adata.obs[f"{key}_pred"] = pd.Categorical.from_codes(codes, categories=classes)
    # A plain array, not a DataFrame: class names may hold "/", which h5 stores refuse as
    # column names; the names are in uns.
    adata.obsm[f"{key}_proba"] = proba


def _var_tokens(adata: AnnData) -> pd.Series:
    """Token id of each ``var_names`` entry as tokenized (-1: not in the vocabulary)."""
    column = adata.var[f"{TOKENS_KEY}_token"].to_numpy().astype(np.int64)
    series = pd.Series(column, index=adata.var_names)
    return series[~series.index.duplicated()]


def _gene_targets(
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
    from_var = _var_tokens(adata).reindex(names).to_numpy()
    unresolved = np.isnan(from_var)
    token = np.where(unresolved, -1, np.nan_to_num(from_var)).astype(np.int64)
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
    codes, classes = _encode_labels(
        table["label"].reset_index(drop=True), where, "leave those genes out of the labels"
    )
    table = table.assign(code=codes).reset_index(drop=True)
    return table, classes


def _finetune_genes(
    adata: AnnData,
    model: Geneformer,
    *,
    label_key: str,
    key: str,
    gene_labels: Mapping[str, Any] | pd.Series | None,
    n_folds: int,
    baseline: bool,
    **options: Any,
) -> GeneformerClassifier:
    tokens, n_tokens = cell_tokens(adata, model)
    table, classes = _gene_targets(adata, model, label_key, gene_labels)
    # Padding (<pad> = 0) lands on id 0, never a gene's, so no mask is needed.
    occurrences = np.bincount(tokens.ravel(), minlength=len(model.vocab))
    absent = occurrences[table["token"]] == 0
    if absent.any():
        warnings.warn(
            f"{int(absent.sum()):,} labelled genes occur in no cell's tokens and are left out, "
            f"e.g. {table.loc[absent, 'gene'].tolist()[:3]}.",
            UserWarning,
            stacklevel=3,
        )
        table = table[~absent].reset_index(drop=True)
    _check_class_sizes(
        table["code"].to_numpy(),
        classes,
        "the labelled genes found in the cells",
        n_folds,
        f"genes to have one in each of the n_folds={n_folds} folds (lower n_folds, or label "
        "more genes)",
    )
    gene_token = table["token"].to_numpy()
    gene_code = table["code"].to_numpy()
    folds = gene_folds(gene_code, n_folds, options["random_state"])
    device, dtype = options["device"], options["dtype"]
    seed_everything(options["random_state"])
    rng = np.random.default_rng(options["random_state"])

    def train_on(genes: np.ndarray, seed: int, desc: str) -> tuple[GeneformerClassifier, dict]:
        token_class = np.full(len(model.vocab), -100, dtype=np.int64)
        token_class[gene_token[genes]] = gene_code[genes]
        cells = np.flatnonzero((token_class >= 0)[tokens].any(axis=1))
        weights = _class_weights(
            np.repeat(gene_code[genes], occurrences[gene_token[genes]]),
            len(classes),
            options["class_weight"],
        )
        targets = torch.as_tensor(token_class, device=device)
        weight_t = torch.as_tensor(weights, device=device)

        def loss_fn(_batch: np.ndarray, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, targets[ids], weight_t, ignore_index=-100)

        clf = _new_classifier(
            model,
            classes,
            task="gene",
            label_key=label_key,
            freeze_layers=options["freeze_layers"],
            random_state=seed,
        )
        history = _fit(
            clf,
            tokens,
            n_tokens,
            cells,
            loss_fn,
            epochs=options["epochs"],
            lr=options["lr"],
            weight_decay=options["weight_decay"],
            budget=options["train_budget"],
            device=device,
            dtype=dtype,
            rng=rng,
            evaluate=None,
            patience=None,
            desc=desc,
        )
        return clf, history

    oof = np.full((len(table), len(classes)), np.nan)
    fold_scores: dict[str, list[float]] = {"auroc": [], "accuracy": [], "n_genes": []}
    histories = []
    for fold in range(n_folds):
        held = np.flatnonzero(folds == fold)
        clf, history = train_on(
            np.flatnonzero(folds != fold), options["random_state"] + fold, f"fold {fold + 1}"
        )
        histories.append({"fold": [fold] * len(history["epoch"]), **history})
        is_held = np.zeros(len(model.vocab), dtype=bool)
        is_held[gene_token[held]] = True
        cells = np.flatnonzero(is_held[tokens].any(axis=1))
        means, _ = _gene_proba(
            clf,
            tokens[cells],
            n_tokens[cells],
            budget=options["eval_budget"],
            device=device,
            dtype=dtype,
            progress=False,
        )
        oof[held] = means[gene_token[held]]
        fold_scores["auroc"].append(_auroc(gene_code[held], oof[held]))
        fold_scores["accuracy"].append(float((oof[held].argmax(axis=1) == gene_code[held]).mean()))
        fold_scores["n_genes"].append(len(held))
        logger.info(
            f"gene fold {fold + 1}/{n_folds}: AUROC {fold_scores['auroc'][-1]:.3f}, accuracy "
            f"{fold_scores['accuracy'][-1]:.3f} over {len(held)} genes."
        )
    final, final_history = train_on(
        np.arange(len(table)), options["random_state"] + n_folds, "final fit"
    )
    histories.append({"fold": [-1] * len(final_history["epoch"]), **final_history})

    pred = oof.argmax(axis=1)
    score = oof[:, 1] if len(classes) == 2 else oof.max(axis=1)
    scores = _metrics(gene_code, pred, len(classes))
    genes_table = {
        "gene": table["gene"].tolist(),
        "token": gene_token,
        "label": [classes[c] for c in gene_code],
        "fold": folds,
        "pred": [classes[c] for c in pred],
        "score": score,
    }
    _write_gene_predictions(adata, key, classes, gene_token, pred, score, folds)
    params = _params(options, n_folds=n_folds)
    adata.uns[f"{key}_finetune"] = {
        "task": "gene",
        "label_key": label_key,
        "classes": classes,
        "folds": fold_scores,
        "auroc": _auroc(gene_code, oof),
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "confusion_matrix": {"labels": classes, "counts": scores["confusion"]},
        "genes": genes_table,
        "history": {k: [v for h in histories for v in h[k]] for k in histories[0]},
        "params": params,
    }
    if baseline:
        _gene_baseline(adata, adata.uns[f"{key}_finetune"], gene_token, gene_code, folds, options)
    final.history = final_history
    final.training_args = {
        **params,
        "task": "gene",
        "label_key": label_key,
        "cv_auroc": adata.uns[f"{key}_finetune"]["auroc"],
        "cv_accuracy": scores["accuracy"],
    }
    return final


def _gene_baseline(
    adata: AnnData,
    result: dict[str, Any],
    gene_token: np.ndarray,
    gene_code: np.ndarray,
    folds: np.ndarray,
    options: Mapping[str, Any],
) -> None:
    """Score the co-expression baseline on the model's folds into ``result["baseline"]``.

    Genes without a column in ``adata`` (labelled through the vocabulary's mapping only) are
    left out of the baseline, which says how many it scored.
    """
    info = adata.uns.get(TOKENS_KEY, {})
    layer = info.get("layer", "X") if isinstance(info, Mapping) else "X"
    counts = adata.X if layer == "X" else adata.layers[layer]
    var_token = adata.var[f"{TOKENS_KEY}_token"].to_numpy().astype(np.int64)
    column_of = pd.Series(np.arange(len(var_token)), index=var_token)
    column_of = column_of[~column_of.index.duplicated()]
    columns = column_of.reindex(gene_token).to_numpy()
    has_column = ~np.isnan(columns)
    fitted = coexpression_baseline(
        counts,
        columns[has_column].astype(np.int64),
        gene_code[has_column],
        folds[has_column],
        len(result["classes"]),
        random_state=options["random_state"],
    )
    fitted["n_genes"] = int(has_column.sum())
    result["baseline"] = fitted
    logger.info(
        f"finetune (genes): cross-validated AUROC {result['auroc']:.3f}; co-expression "
        f"baseline {fitted['auroc']:.3f}."
    )


def _auroc(truth: np.ndarray, proba: np.ndarray) -> float:
    """AUROC of the second class with two classes, else one-vs-rest macro AUROC."""
    from sklearn.metrics import roc_auc_score

    if proba.shape[1] == 2:
        return float(roc_auc_score(truth == 1, proba[:, 1]))
    return float(roc_auc_score(truth, proba, multi_class="ovr", labels=np.arange(proba.shape[1])))


def _write_gene_predictions(
    adata: AnnData,
    key: str,
    classes: list[str],
    gene_token: np.ndarray,
    pred: np.ndarray,
    score: np.ndarray,
    folds: np.ndarray | None,
) -> None:
    """Per-gene results onto the ``var`` rows holding each gene's token; NaN elsewhere."""
    var_token = adata.var[f"{TOKENS_KEY}_token"].to_numpy().astype(np.int64)
    row_of_token = pd.Series(np.arange(len(gene_token)), index=gene_token)
    rows = row_of_token.reindex(var_token).to_numpy()
    found = ~np.isnan(rows)
    index = np.nan_to_num(rows).astype(np.int64)
    codes = np.where(found, pred[index], -1)
    adata.var[f"{key}_pred"] = pd.Categorical.from_codes(codes, categories=classes)
    adata.var[f"{key}_score"] = np.where(found, score[index], np.nan)
    if folds is not None:
        adata.var[f"{key}_fold"] = np.where(found, folds[index], -1)


def predict(
    adata: AnnData,
    clf: GeneformerClassifier,
    *,
    key_added: str | None = None,
    batch_tokens: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Apply a fine-tuned classifier to cells.

    The cells are tokenized with the classifier's vocabulary first when
    ``obsm["geneformer_tokens"]`` is absent; tokens made with another vocabulary are refused.

    Parameters
    ----------
    adata
        Cells; tokens or raw counts.
    clf
        From :func:`finetune`, or loaded with
        :meth:`~scgeneformer.GeneformerClassifier.from_pretrained`.
    key_added
        Prefix of the result slots; default the classifier's ``label_key``, else
        ``"geneformer_class"``.
    batch_tokens
        Tokens per batch (default ``sgf.settings.token_budget``).
    device, dtype
        Default ``sgf.settings``; the classifier is moved to ``device``.

    Returns
    -------
    None. A cell classifier writes ``obs[f"{key}_pred"]`` (categorical) and
    ``obsm[f"{key}_proba"]`` (columns ordered as ``uns[f"{key}_predict"]["classes"]``) for
    every cell (NaN for cells without tokens, with a warning), and ``uns[f"{key}_predict"]``.
    A gene classifier averages each gene's token probabilities over the cells and writes
    ``var[f"{key}_pred"]``, ``var[f"{key}_score"]`` (as in :func:`finetune`),
    ``var[f"{key}_n_cells"]`` and ``uns[f"{key}_predict"]``.

    Examples
    --------
    >>> clf = sgf.tl.finetune(reference, model, label_key="cell_type")  # doctest: +SKIP
    >>> sgf.tl.predict(query, clf)  # doctest: +SKIP
    >>> query.obs["cell_type_pred"].value_counts()  # doctest: +SKIP
    """
    if not isinstance(clf, GeneformerClassifier):
        raise TypeError(f"clf must be a GeneformerClassifier, got {type(clf).__name__}.")
    key = key_added or clf.label_key or DEFAULT_PREDICT_KEY
    device_, dtype_ = resolve_device_dtype(device, dtype)
    tokens, n_tokens = cell_tokens(adata, clf.encoder)
    empty = int((n_tokens == 0).sum())
    if empty:
        warnings.warn(
            f"{empty:,} cells have no tokens; they get no prediction (NaN).",
            UserWarning,
            stacklevel=2,
        )
    info: dict[str, Any] = {
        "task": clf.task,
        "classes": clf.classes,
        "vocabulary_sha256": clf.vocab.sha256,
        "n_cells_without_tokens": empty,
    }
    run = {"budget": batch_tokens, "device": device_, "dtype": dtype_}
    if clf.task == "cell":
        proba = _cell_proba(clf, tokens, n_tokens, progress=settings.progress, **run)
        _write_cell_predictions(adata, key, clf.classes, proba)
    else:
        means, counts = _gene_proba(clf, tokens, n_tokens, progress=settings.progress, **run)
        seen = np.flatnonzero(counts > 0)
        proba = means[seen]
        score = proba[:, 1] if clf.n_classes == 2 else proba.max(axis=1)
        _write_gene_predictions(
            adata, key, clf.classes, seen, proba.argmax(axis=1), score, folds=None
        )
        var_token = adata.var[f"{TOKENS_KEY}_token"].to_numpy().astype(np.int64)
        adata.var[f"{key}_n_cells"] = np.where(var_token >= 0, counts[np.maximum(var_token, 0)], 0)
    adata.uns[f"{key}_predict"] = info
