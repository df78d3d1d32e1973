"""LoRA adapters (Hu et al. 2021) on a classifier's encoder, through ``peft``.

Low-rank updates ``W + (alpha / r) * B @ A`` are injected into chosen Linear layers of the
transformer layers (``peft.inject_adapter_in_model``, which works on any module with named
Linear layers, so our own encoder needs no transformers model around it). The encoder's own
weights, embeddings included, are frozen; the adapters and the heads (pooler, classifier) train.

The frozen base is identified by :func:`encoder_sha256`, a hash of its tensors, so a saved
adapter (:mod:`._lora_folder`) is only ever applied to the weights it was trained on.
``peft`` is imported only when an adapter is made or loaded (importing it takes seconds).
"""

from __future__ import annotations

import copy
import hashlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._encoder import Dropout
from ._quantize import quantize_linears

if TYPE_CHECKING:
    from ._classifier import GeneformerClassifier

ADAPTERS = ("lora",)
ADAPTER_NAME = "default"  # peft's name of the one adapter; never written to disk
# The Linear layers of one transformer layer an adapter may target, by a short name; values
# are module paths inside ``bert.encoder.layer.<i>``.
TARGETS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_PIP = "pip install 'scgeneformer[lora]'"


@dataclass(frozen=True)
class LoraOptions:
    """The LoRA settings of :func:`scgeneformer.tl.finetune` (``adapter_options=``).

    Parameters
    ----------
    r
        Rank of the update of each targeted weight matrix.
    alpha
        Scale: the update is multiplied by ``alpha / r`` (peft's ``lora_alpha``).
    dropout
        Dropout on the adapters' input, in [0, 1).
    target_modules
        Which Linear layers of every trained transformer layer get an adapter, by short
        name: ``"query"``, ``"key"``, ``"value"`` (self-attention's projections; the
        default), ``"attention_output"``, ``"intermediate"`` and ``"output"`` (the
        feed-forward's two layers).

    Examples
    --------
    >>> LoraOptions(r=4, target_modules=("query", "value"))
    LoraOptions(r=4, alpha=16.0, dropout=0.1, target_modules=('query', 'value'))
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = field(default=("query", "key", "value"))

    def __post_init__(self) -> None:
        r, alpha, dropout = self.r, self.alpha, self.dropout
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
            raise ValueError(f"adapter_options['r'] must be a whole number >= 1, got {r!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise ValueError(f"adapter_options['alpha'] must be a positive number, got {alpha!r}.")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not (0 <= dropout < 1)
        ):
            raise ValueError(f"adapter_options['dropout'] must be in [0, 1), got {dropout!r}.")
        targets = self.target_modules
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ValueError(
                f"adapter_options['target_modules'] must name one or more of {list(TARGETS)}, "
                f"got {list(targets)}" + (f" ({unknown} unknown)." if unknown else ".")
            )
        object.__setattr__(self, "r", int(r))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "target_modules", tuple(dict.fromkeys(targets)))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples), as saved and recorded in ``uns``."""
        return {
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
        }


def lora_options(
    adapter: str | None, adapter_options: Mapping[str, Any] | LoraOptions | None
) -> LoraOptions | None:
    """Check ``adapter=`` and ``adapter_options=`` of the tools; the options, or None.

    Examples
    --------
    >>> lora_options("lora", {"r": 4}).r
    4
    >>> lora_options(None, None) is None
    True
    """
    if adapter is None:
        if adapter_options is not None:
            raise ValueError("adapter_options is given but adapter=None; pass adapter='lora'.")
        return None
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be None or one of {list(ADAPTERS)}, got {adapter!r}.")
    require_peft()  # before any work: the error comes first, not after tokenizing
    if isinstance(adapter_options, LoraOptions):
        return adapter_options
    if adapter_options is None:
        return LoraOptions()
    if not isinstance(adapter_options, Mapping):
        raise TypeError(
            f"adapter_options must be a mapping or a LoraOptions, got "
            f"{type(adapter_options).__name__}."
        )
    known = LoraOptions.__dataclass_fields__
    unknown = [k for k in adapter_options if k not in known]
    if unknown:
        raise ValueError(
            f"adapter_options has unknown key(s) {unknown}; the LoRA options are {list(known)}."
        )
    return LoraOptions(**adapter_options)


def require_peft() -> Any:
    """Import ``peft``, or raise an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"adapter='lora' needs peft: {_PIP}.") from err
    return peft


@dataclass(frozen=True)
class LoraAdapter:
    """What a classifier records of its adapter: the options and the base it adapts.

    ``base_sha256`` is :func:`encoder_sha256` of the frozen encoder before the adapters were
    injected (and before any quantization); ``base_folder`` the folder the encoder was
    loaded from, if it was (None for a model built with ``from_config``).
    """

    options: LoraOptions
    freeze_layers: int
    base_sha256: str
    base_folder: Path | None = None
    quantize: str | None = None


def encoder_sha256(bert: nn.Module) -> str:
    """Hash of an encoder's tensors: names, shapes and float32 values, adapters left out.

    The file format (safetensors, ``.bin``, shards) and the dtype the weights were kept in
    do not change it; any changed value does. Modules wrapped by peft hash as the plain
    Linear layers they wrap.

    Examples
    --------
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> encoder_sha256(a) == encoder_sha256(copy.deepcopy(a)) != encoder_sha256(b)
    True
    """
    state = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in bert.state_dict().items()
        if "lora_" not in name
    }
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def target_names(options: LoraOptions, num_layers: int, freeze_layers: int) -> list[str]:
    """Return the modules inside ``bert.encoder`` that get an adapter (layers ``freeze_layers``..).

    Examples
    --------
    >>> target_names(LoraOptions(target_modules=("query",)), 3, 1)
    ['layer.1.attention.self.query', 'layer.2.attention.self.query']
    """
    if freeze_layers >= num_layers:
        raise ValueError(
            f"freeze_layers={freeze_layers} leaves none of the {num_layers} layers for the "
            f"adapter; with adapter='lora' the first freeze_layers layers get no adapter. "
            f"Use freeze_layers < {num_layers}."
        )
    return [
        f"layer.{i}.{TARGETS[t]}"
        for i in range(freeze_layers, num_layers)
        for t in options.target_modules
    ]


def lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield the peft LoRA layers inside ``module`` with their names (none without peft)."""
    peft = sys.modules.get("peft")  # not imported: no module can hold its layers
    if peft is None:
        return
    from peft.tuners.lora import LoraLayer

    for name, sub in module.named_modules():
        if isinstance(sub, LoraLayer):
            yield name, sub


def add_lora(
    clf: GeneformerClassifier,
    options: LoraOptions,
    *,
    freeze_layers: int = 0,
    quantize: str | None = None,
    device: torch.device | None = None,
    base_sha256: str | None = None,
) -> GeneformerClassifier:
    """Inject LoRA adapters into ``clf``'s encoder, in place; freeze everything else of it.

    Parameters
    ----------
    clf
        A classifier without an adapter (a fresh one from ``from_encoder``).
    options
        The LoRA settings.
    freeze_layers
        The first ``freeze_layers`` transformer layers get no adapter (so they are not
        trained, as ``freeze_layers`` means without an adapter).
    quantize
        ``"4bit"`` or ``"8bit"``: first replace the frozen Linear layers of the transformer
        layers by bitsandbytes' (CUDA only; see :mod:`._quantize`).
    device
        Where the quantized layers go (the fit's device); default the encoder's.
    base_sha256
        :func:`encoder_sha256` of the encoder, when the caller has it already.

    Returns
    -------
    ``clf``, with :attr:`~GeneformerClassifier.adapter` set. The heads stay trainable.

    Examples
    --------
    >>> add_lora(clf, LoraOptions(r=2)).adapter.options.r  # doctest: +SKIP
    2
    """
    peft = require_peft()
    if clf.adapter is not None or next(lora_layers(clf), None) is not None:
        raise ValueError(
            "This classifier has a LoRA adapter already; merge it first "
            "(clf.merge_adapter()) to add another."
        )
    encoder = clf.encoder
    stack = encoder.bert.encoder
    targets = target_names(options, encoder.num_layers, freeze_layers)
    base_sha256 = base_sha256 or encoder_sha256(encoder.bert)
    if quantize is not None:
        quantize_linears(stack, quantize, device or encoder.device)
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        bias="none",
    )
    peft.inject_adapter_in_model(config, stack, adapter_name=ADAPTER_NAME)
    encoder.requires_grad_(False)
    for _, layer in lora_layers(stack):
        # peft's nn.Dropout only reads module.training; ours is also off inside
        # dropout_disabled(), where predictions run, so a model left in training mode
        # predicts the same every time.
        for key, drop in layer.lora_dropout.items():
            if isinstance(drop, nn.Dropout):
                layer.lora_dropout[key] = Dropout(drop.p)
        for name, param in layer.named_parameters():
            param.requires_grad_(name.startswith(("lora_A.", "lora_B.")))
    clf.adapter = LoraAdapter(
        options, int(freeze_layers), base_sha256, encoder.source_folder, quantize
    )
    return clf


def adapter_parameters(clf: GeneformerClassifier) -> dict[str, nn.Parameter]:
    """Return the adapters' parameters by their saved names (``bert.…lora_A.weight``)."""
    tag = f".{ADAPTER_NAME}."
    return {
        "bert." + name.replace(tag, "."): param
        for name, param in clf.encoder.bert.named_parameters()
        if "lora_" in name
    }


def merge_lora(clf: GeneformerClassifier) -> GeneformerClassifier:
    """Return a plain classifier whose weights are ``clf``'s with the adapters merged in.

    ``clf`` is left as it is. The result has no adapter, trains every weight, as a classifier
    from ``from_encoder`` does, and saves as a full transformers folder.
    """
    if clf.adapter is None:
        raise ValueError("This classifier has no adapter to merge.")
    if clf.adapter.quantize is not None:
        raise ValueError(
            f"A classifier on a {clf.adapter.quantize} quantized base cannot be merged into "
            "full-precision weights here. Save its adapter (clf.save(folder)), load that "
            "without quantization (GeneformerClassifier.from_pretrained(folder)), and merge "
            "the loaded one."
        )
    merged = copy.deepcopy(clf, memo={id(clf.vocab): clf.vocab})
    for name, layer in list(lora_layers(merged)):
        layer.merge(safe_merge=True)  # refuses a merge that would make a weight non-finite
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child, layer.get_base_layer())
    merged.adapter = None
    merged.encoder.source_folder = None  # its merged weights are in no folder
    merged.requires_grad_(True)
    return merged


def trainable_fraction(module: nn.Module) -> float:
    """Share of ``module``'s parameters that train.

    Examples
    --------
    >>> net = nn.Linear(3, 1)
    >>> _ = net.bias.requires_grad_(False)
    >>> trainable_fraction(net)
    0.75
    """
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / max(total, 1)


def describe(adapter: LoraAdapter) -> str:
    """One line for reprs and logs."""
    opts = adapter.options
    where = f", from layer {adapter.freeze_layers}" if adapter.freeze_layers else ""
    quant = f", {adapter.quantize} base" if adapter.quantize else ""
    return f"lora(r={opts.r}, alpha={opts.alpha:g}, {'+'.join(opts.target_modules)}{where}{quant})"
