"""Cell and gene classifiers on the Geneformer encoder, in transformers' BERT classifier layout.

A cell classifier is ``BertForSequenceClassification``: the encoder, BERT's pooler (dense +
tanh on the hidden state at position 0) and dropout + a linear layer. A gene classifier is
``BertForTokenClassification``: the encoder and dropout + a linear layer on every token's last
hidden state. Parameter names on disk are transformers' (``bert.*``, ``bert.pooler.dense.*``,
``classifier.*``), so official fine-tuned Geneformer classifiers load here and the classifiers
saved here load in transformers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..train._history import as_history, empty_history
from ..vocab import Vocabulary
from . import _hf_folder as ckpt
from ._encoder import Dropout, init_weights
from ._geneformer import Geneformer, TensorLike
from ._lora import LoraAdapter, describe, merge_lora
from ._lora_folder import is_adapter_folder, load_adapter_folder, save_adapter_folder

Task = Literal["cell", "gene"]
ARCHITECTURES: dict[str, str] = {
    "cell": "BertForSequenceClassification",
    "gene": "BertForTokenClassification",
}
METADATA_FORMAT = "scgeneformer-classifier"
_ENCODER_PREFIX = "bert."
_POOLER_PREFIX = "bert.pooler.dense."
_HEAD_PREFIX = "classifier."


class Pooler(nn.Module):
    """BERT's pooler: a dense layer and tanh on one hidden state per cell."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        """Pool ``(cells, hidden)`` states of each cell's first token."""
        return torch.tanh(self.dense(first))


class GeneformerClassifier(nn.Module):
    """A Geneformer encoder with a cell (sequence) or gene (token) classification head.

    Build one with :meth:`from_encoder` (a copy of a pretrained model and a fresh head, what
    :func:`scgeneformer.tl.finetune` does) or :meth:`from_pretrained` (a saved or official
    fine-tuned folder); save it with :meth:`save`.

    The cell head mirrors ``BertForSequenceClassification`` exactly: the pooler reads the hidden
    state at **position 0** of each cell. With a V2-style vocabulary that is ``<cls>``; with a
    V1-style vocabulary (no ``<cls>``, as the official V1 classifiers) it is the cell's
    top-ranked gene, whose state has attended to the whole cell. That is what the official
    classifiers were trained with, so it is kept for them to predict as they do in
    transformers.

    Parameters
    ----------
    encoder
        The encoder, used as it is (not copied). Its MLM head, if any, is not part of the
        classifier and is never saved with it.
    classes
        Class names, in the order of the logits.
    task
        ``"cell"`` (one prediction per cell) or ``"gene"`` (one per token).
    classifier_dropout
        Dropout before the linear layer; None uses the encoder's ``hidden_dropout_prob``, as
        transformers does.
    label_key
        Name of the labels the classifier was trained on (used as the default result key).

    Attributes
    ----------
    encoder
        The :class:`~scgeneformer.Geneformer`.
    pooler
        :class:`Pooler` for cell classifiers, None for gene classifiers.
    classifier
        The linear layer ``hidden -> n_classes``.
    history
        Training history, ``{"train": [...], "eval": [...]}`` records (see
        :mod:`scgeneformer.train._history`); empty lists if unknown.
    training_args
        JSON-serialisable dict saved with the classifier.
    adapter
        For a LoRA classifier (``tl.finetune(..., adapter="lora")``), what it records of its
        adapter: options and base identity (:class:`~scgeneformer.model._lora.LoraAdapter`);
        else None. A LoRA classifier trains only its adapters and heads, saves only those
        (and its base's identity), and :meth:`merge_adapter` turns it into a plain one.

    Examples
    --------
    >>> import scgeneformer as sgf, torch
    >>> from scgeneformer.model._classifier import GeneformerClassifier
    >>> genes = [f"ENSG{i:011d}" for i in range(50)]
    >>> vocab = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> clf = GeneformerClassifier.from_encoder(model, ["healthy", "disease"], random_state=0)
    >>> clf.eval()(torch.tensor([[5, 9, 3, 0], [7, 2, 8, 11]])).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        encoder: Geneformer,
        classes: Sequence[str],
        *,
        task: Task = "cell",
        classifier_dropout: float | None = None,
        label_key: str | None = None,
    ) -> None:
        super().__init__()
        if task not in ARCHITECTURES:
            raise ValueError(f"task must be one of {list(ARCHITECTURES)}, got {task!r}.")
        classes = [str(c) for c in classes]
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"A classifier needs at least two distinct classes, got {classes}.")
        hidden = encoder.hidden_size
        self.encoder = encoder
        self.task: Task = task
        self.classes = classes
        self.label_key = label_key
        self.classifier_dropout = classifier_dropout
        self.pooler = Pooler(hidden) if task == "cell" else None
        self.dropout = Dropout(
            encoder.config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
        )
        self.classifier = nn.Linear(hidden, len(classes))
        self.history: dict[str, list[dict[str, Any]]] = empty_history()
        self.training_args: dict[str, Any] = {}
        self.adapter: LoraAdapter | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_encoder(
        cls,
        model: Geneformer,
        classes: Sequence[str],
        *,
        task: Task = "cell",
        label_key: str | None = None,
        random_state: int | None = None,
    ) -> GeneformerClassifier:
        """Build a new classifier: a copy of ``model``'s encoder and a freshly initialised head.

        ``model`` itself is left untouched (fine-tuning changes the copy only); the copy has no
        MLM head. The head is initialised as transformers does (normal with the config's
        ``initializer_range``, zero biases).

        Parameters
        ----------
        model
            A pretrained (or fresh) :class:`~scgeneformer.Geneformer`.
        classes
            Class names.
        task
            ``"cell"`` or ``"gene"``.
        label_key
            Name of the labels (recorded).
        random_state
            Seed for the head's initial weights.

        Returns
        -------
        The classifier, on the encoder's device, in training mode.

        Examples
        --------
        >>> clf = GeneformerClassifier.from_encoder(model, ["T", "B", "NK"], random_state=0)
        >>> clf.n_classes
        3
        """
        # Share the vocabulary instead of copying it: it is immutable and can be large.
        encoder = copy.deepcopy(model, memo={id(model.vocab): model.vocab})
        encoder.cls = None
        clf = cls(encoder, classes, task=task, label_key=label_key)
        generator = None if random_state is None else torch.Generator().manual_seed(random_state)
        heads = [m for m in (clf.pooler, clf.classifier) if m is not None]
        for head in heads:
            init_weights(head, model.config.initializer_range, generator)
        return clf.to(model.device).train()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        vocab: Vocabulary | None = None,
        *,
        base: str | os.PathLike | None = None,
    ) -> GeneformerClassifier:
        """Load a classifier folder in the transformers layout, or a LoRA classifier's folder.

        Reads folders written by :meth:`save` and by transformers'
        ``BertForSequenceClassification`` / ``BertForTokenClassification.save_pretrained``
        (official fine-tuned Geneformer classifiers among them; ``model.safetensors`` or
        ``pytorch_model.bin``). Class names come from ``id2label``. A LoRA classifier's
        folder (adapters and heads only) is applied to its base model, found where it was
        when saved (or at ``base``) and refused unless its weights are the ones the adapter
        was trained on; this needs ``peft``.

        Parameters
        ----------
        folder
            The checkpoint folder.
        vocab
            The vocabulary, when the folder holds none (official classifiers ship without
            one: pass the vocabulary of the model they were fine-tuned from).
        base
            LoRA classifiers only: the base model's folder, when it has moved since the save.

        Returns
        -------
        The classifier, float32 on the CPU, in evaluation mode.

        Examples
        --------
        >>> clf = GeneformerClassifier.from_pretrained("my_classifier")  # doctest: +SKIP
        """
        if is_adapter_folder(Path(folder)):
            return load_adapter_folder(cls, folder, vocab, base)
        if base is not None:
            raise ValueError(
                f"base= is for LoRA classifier folders; {str(folder)!r} holds a full classifier."
            )
        # Checks config, vocabulary and encoder; the heads are read from the same raw weights.
        encoder, raw, weights_path = Geneformer._load_folder(folder, vocab)
        folder = Path(folder)
        config = ckpt.read_json(folder / ckpt.CONFIG_NAME, "Model config")
        architectures = list(config.get("architectures") or [])
        task = next((t for t, a in ARCHITECTURES.items() if a in architectures), None)
        if task is None:
            raise ValueError(
                f"The checkpoint in {str(folder)!r} is a {architectures or 'BERT model'}, not a "
                f"classifier ({' or '.join(ARCHITECTURES.values())}). Load it with "
                "sgf.Geneformer.from_pretrained and fine-tune it with sgf.tl.finetune."
            )
        problem_type = config.get("problem_type")
        if problem_type not in (None, "single_label_classification"):
            raise ValueError(
                f"The classifier in {str(folder)!r} has problem_type={problem_type!r}; only "
                "single-label classification is supported."
            )
        classes = _classes_from_config(config)
        metadata_path = folder / ckpt.METADATA_NAME
        metadata = ckpt.read_json(metadata_path, "Metadata") if metadata_path.is_file() else {}
        clf = cls(
            encoder,
            classes,
            task=task,
            classifier_dropout=config.get("classifier_dropout"),
            label_key=metadata.get("label_key"),
        )
        clf._load_heads(raw, str(weights_path))
        clf.history = as_history(metadata.get("history") or {})
        clf.training_args = dict(metadata.get("training_args") or {})
        if config.get("tasks"):  # one head per label column, saved as one linear layer
            from ._multitask import MultitaskClassifier

            clf = MultitaskClassifier.from_flat(clf, config["tasks"])
        return clf.float().eval()

    def _head_modules(self) -> dict[str, nn.Module]:
        heads: dict[str, nn.Module] = {_HEAD_PREFIX: self.classifier}
        if self.pooler is not None:
            heads[_POOLER_PREFIX] = self.pooler.dense
        return heads

    def _load_heads(self, raw: Mapping[str, torch.Tensor], source: str) -> None:
        for prefix, module in self._head_modules().items():
            for name, param in module.named_parameters():
                key = prefix + name
                if key not in raw:
                    raise ValueError(
                        f"Checkpoint {source!r} has no {key}: it is not a complete "
                        f"{ARCHITECTURES[self.task]}."
                    )
                if raw[key].shape != param.shape:
                    raise ValueError(
                        f"Checkpoint {source!r}: {key} has shape {tuple(raw[key].shape)}, but "
                        f"config.json implies {tuple(param.shape)} ({self.n_classes} classes "
                        f"in id2label, hidden size {self.encoder.hidden_size})."
                    )
                with torch.no_grad():
                    param.copy_(raw[key])

    def save(
        self,
        folder: str | os.PathLike,
        *,
        merged: bool = False,
        base: str | os.PathLike | None = None,
    ) -> Path:
        """Write the classifier as a transformers folder, atomically.

        ``config.json`` (architecture ``BertForSequenceClassification`` or
        ``BertForTokenClassification``, ``id2label``, ``label2id``, ``num_labels``,
        ``problem_type``), ``model.safetensors`` (``bert.*``, ``bert.pooler.dense.*``,
        ``classifier.*``), ``vocab.json`` and ``scgeneformer.json`` (vocabulary sha256, task,
        label key, training history and arguments). The folder loads with
        :meth:`from_pretrained` and with transformers' class of the same name.

        A LoRA classifier writes only its adapters and heads (``adapter_model.safetensors``:
        0.57 MB for V1-10M with the default options, against 41 MB) and its base model's
        identity (folder and weights hash, checked against the base folder now);
        :meth:`from_pretrained` applies them to that base again. The folder is in peft's
        layout too (``adapter_config.json``): ``peft.PeftModel.from_pretrained(model,
        folder)`` loads it onto ``BertForSequenceClassification.from_pretrained(base)``. With
        ``merged=True`` it writes the full folder above instead, adapters merged in.

        Parameters
        ----------
        folder
            Target folder; created, or updated in place when it exists.
        merged
            LoRA classifiers: write :meth:`merge_adapter`'s full classifier instead of the
            adapters (without effect on a plain classifier, which is full already).
        base
            LoRA classifiers: the folder of the model it was fine-tuned from, when that model
            was not loaded from a folder (default: the folder it was loaded from).

        Returns
        -------
        The folder.

        Examples
        --------
        >>> clf.save("my_classifier")  # doctest: +SKIP
        """
        if self.adapter is not None:
            if merged:
                return self.merge_adapter().save(folder)
            return save_adapter_folder(self, folder, base)
        if base is not None:
            raise ValueError("base= is for LoRA classifiers; this one has no adapter.")
        state = {_ENCODER_PREFIX + k: v for k, v in self.encoder.bert.state_dict().items()}
        for prefix, module in self._head_modules().items():
            state.update({prefix + k: v for k, v in module.state_dict().items()})
        return ckpt.write_checkpoint(folder, self._hf_config(), state, self.vocab, self._metadata())

    def _hf_config(self) -> dict[str, Any]:
        """Return the transformers ``config.json`` of this classifier."""
        config = self.encoder.config.to_hf_dict(architecture=ARCHITECTURES[self.task])
        config.update(
            id2label={str(i): c for i, c in enumerate(self.classes)},
            label2id={c: i for i, c in enumerate(self.classes)},
            num_labels=self.n_classes,
            problem_type="single_label_classification",
            classifier_dropout=self.classifier_dropout,
            **self._config_extras(),
        )
        return config

    def _metadata(self) -> dict[str, Any]:
        """Return what ``scgeneformer.json`` records of this classifier (savers add more)."""
        return {
            "format": METADATA_FORMAT,
            "task": self.task,
            "label_key": self.label_key,
            "classes": self.classes,
            "preset": self.encoder.preset,
            "history": self.history,
            "training_args": self.training_args,
        }

    def merge_adapter(self) -> GeneformerClassifier:
        """Return a plain classifier: this LoRA classifier's weights, the adapters merged in.

        Each adapted weight becomes ``W + (alpha / r) * B @ A``; the result predicts as this
        classifier does (to float rounding), has no adapter and saves as a full transformers
        folder. This classifier is left as it is.

        Examples
        --------
        >>> full = lora_clf.merge_adapter()  # doctest: +SKIP
        >>> full.save("full_classifier")  # doctest: +SKIP
        """
        return merge_lora(self)

    def _config_extras(self) -> dict[str, Any]:
        """Further ``config.json`` entries of a subclass (a multitask one records its tasks)."""
        return {}

    # ------------------------------------------------------------------ properties
    @property
    def vocab(self) -> Vocabulary:
        """The encoder's vocabulary."""
        return self.encoder.vocab

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.classifier.weight.device

    def extra_repr(self) -> str:
        """Summarise task and classes in the module's repr."""
        shown = ", ".join(self.classes[:5]) + (", …" if self.n_classes > 5 else "")
        adapter = "" if self.adapter is None else f", adapter={describe(self.adapter)}"
        return f"task={self.task!r}, classes=[{shown}] ({self.n_classes}){adapter}"

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: TensorLike,
        attention_mask: TensorLike | None = None,
        *,
        cu_seqlens: TensorLike | None = None,
        max_seqlen: int | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """Class logits of padded or packed cells.

        Parameters
        ----------
        input_ids
            Padded ``(cells, length)`` token ids, or packed ``(total_tokens,)`` ones when
            ``cu_seqlens`` is given (see :func:`scgeneformer.data.pack_tokens`).
        attention_mask
            Padded layout only: True/1 for real tokens (default: every non-``<pad>``).
        cu_seqlens, max_seqlen
            Packed layout: offsets of the cells and the longest length.
        validate
            Check the token ids against the vocabulary (a device sync); training loops whose
            tokens were checked once up front pass False.

        Returns
        -------
        Cell task: ``(cells, n_classes)``. Gene task: ``(cells, length, n_classes)`` padded,
        ``(total_tokens, n_classes)`` packed.

        Examples
        --------
        >>> clf(torch.tensor([[5, 9, 3, 0]])).shape
        torch.Size([1, 2])
        """
        if cu_seqlens is None:
            hidden = self.encoder.hidden_states(input_ids, attention_mask, validate=validate)
            first = hidden[:, 0]
        else:
            if max_seqlen is None:
                raise ValueError("Packed input (cu_seqlens) needs max_seqlen.")
            hidden = self.encoder.hidden_states_packed(
                input_ids, cu_seqlens, max_seqlen, validate=validate
            )
            first = hidden[torch.as_tensor(cu_seqlens, device=hidden.device)[:-1].long()]
        if self.pooler is None:
            return self.classifier(self.dropout(hidden))
        return self.classifier(self.dropout(self.pooler(first)))

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax of :meth:`forward`'s logits over the classes, in float32.

        Examples
        --------
        >>> clf.class_probabilities(torch.zeros(1, 2))
        tensor([[0.5000, 0.5000]])
        """
        return torch.softmax(logits.float(), dim=-1)

    def freeze_layers(self, n_layers: int) -> None:
        """Stop training the first ``n_layers`` transformer layers, as Geneformer does.

        Geneformer's classifiers freeze ``bert.encoder.layer[:n_layers]`` and nothing else (the
        embeddings keep training); so does this. 0 unfreezes every layer.

        Examples
        --------
        >>> clf.freeze_layers(1)
        >>> clf.encoder.bert.encoder.layer[0].output.dense.weight.requires_grad
        False
        """
        n_layers = check_freeze_layers(n_layers, self.encoder.num_layers)
        if self.adapter is not None:
            raise ValueError(
                "A LoRA classifier trains only its adapters and heads; its first layers go "
                "without adapters when it is made (tl.finetune(..., freeze_layers=n))."
            )
        for index, layer in enumerate(self.encoder.bert.encoder.layer):
            layer.requires_grad_(index >= n_layers)


def check_freeze_layers(n_layers: int, num_layers: int) -> int:
    """Return ``n_layers`` as an int if it is a valid number of layers to freeze, else raise.

    Examples
    --------
    >>> check_freeze_layers(2, 6)
    2
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int | np.integer):
        raise TypeError(f"freeze_layers must be an integer, got {n_layers!r}.")
    if not 0 <= n_layers <= num_layers:
        raise ValueError(
            f"freeze_layers must be in [0, {num_layers}] for a {num_layers}-layer model, got "
            f"{n_layers}."
        )
    return int(n_layers)


def _classes_from_config(config: Mapping[str, Any]) -> list[str]:
    """Class names in logit order from ``id2label``, or transformers' defaults."""
    id2label = config.get("id2label")
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError as err:
        raise ValueError(f"config.json id2label has non-integer ids: {list(id2label)}.") from err
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(
            f"config.json id2label must number the classes 0..n-1, got {sorted(by_id)}."
        )
    return [by_id[i] for i in range(len(by_id))]


__all__ = ["ARCHITECTURES", "GeneformerClassifier", "Pooler", "check_freeze_layers"]
