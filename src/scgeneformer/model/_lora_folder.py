"""LoRA classifier folders: the adapters and heads only, and the identity of the base.

A folder holds ``config.json`` (the classifier's transformers config, as a full save writes
it), ``adapter_model.safetensors`` and ``adapter_config.json`` in peft's layout
(``base_model.model.bert.…lora_A.weight`` / ``lora_B.weight``, and the heads as
``modules_to_save``: ``base_model.model.bert.pooler.dense.*``, ``…classifier.*``),
``vocab.json`` and ``scgeneformer.json`` (format ``scgeneformer-lora-classifier``, the LoRA
options, and the base: its folder, absolute and relative to this one, and
:func:`~._lora.encoder_sha256` of its weights). So peft loads the folder too, onto
transformers' classifier made from the base folder (``PeftModel.from_pretrained``). There is
no ``model.safetensors``, so transformers alone refuses the folder instead of loading a model
without its encoder; :meth:`GeneformerClassifier.merge_adapter` makes the folder it loads.

Both saving and loading load the base and compare its hash with the recorded one: an adapter
is never saved against a base that is not the one it was trained on, nor applied to another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..train._history import as_history
from ..vocab import Vocabulary
from . import _hf_folder as ckpt
from ._geneformer import Geneformer
from ._lora import (
    LoraOptions,
    adapter_parameters,
    add_lora,
    encoder_sha256,
    require_peft,
    target_names,
)

if TYPE_CHECKING:
    from ._classifier import GeneformerClassifier

ADAPTER_WEIGHTS = ckpt.ADAPTER_WEIGHTS_NAME
ADAPTER_FORMAT = ckpt.ADAPTER_FORMAT
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's names: the transformers model's, under this
_PEFT_TASKS = {"cell": "SEQ_CLS", "gene": "TOKEN_CLS"}


def is_adapter_folder(folder: Path) -> bool:
    """Whether ``folder``'s metadata says it holds a LoRA classifier."""
    path = Path(folder) / ckpt.METADATA_NAME
    return path.is_file() and ckpt.read_json(path, "Metadata").get("format") == ADAPTER_FORMAT


def _load_base(base: Path, vocab: Vocabulary | None, recorded: str, action: str) -> Geneformer:
    """Load the encoder of the base folder; refuse it unless it hashes as ``recorded``."""
    encoder = Geneformer._load_folder(base, vocab)[0]
    encoder.cls = None  # a classifier's encoder has no MLM head
    found = encoder_sha256(encoder.bert)
    if found != recorded:
        raise ValueError(
            f"The model in {str(base)!r} is not the base this LoRA adapter was trained on (its "
            f"weights hash to {found[:12]}…, the adapter's base to {recorded[:12]}…): it was "
            f"changed or replaced, so the adapter {action}. Point base= at the model the "
            "classifier was fine-tuned from."
        )
    return encoder


def _peft_config(clf: GeneformerClassifier, base: Path) -> dict[str, Any]:
    """Return peft's ``adapter_config.json`` for ``clf`` on transformers' classifier."""
    adapter = clf.adapter
    assert adapter is not None
    names = target_names(adapter.options, clf.encoder.num_layers, adapter.freeze_layers)
    return {
        "peft_type": "LORA",
        "task_type": _PEFT_TASKS[clf.task],
        "base_model_name_or_path": str(base),
        "r": adapter.options.r,
        "lora_alpha": adapter.options.alpha,
        "lora_dropout": adapter.options.dropout,
        "target_modules": ["bert.encoder." + name for name in names],
        "modules_to_save": [prefix.rstrip(".") for prefix in clf._head_modules()],
        "bias": "none",
        "inference_mode": True,
    }


def save_adapter_folder(
    clf: GeneformerClassifier, folder: str | os.PathLike, base: str | os.PathLike | None
) -> Path:
    """Write a LoRA classifier's folder (see the module docstring); return the folder."""
    adapter = clf.adapter
    assert adapter is not None
    base_folder = Path(base) if base is not None else adapter.base_folder
    if base_folder is None:
        raise ValueError(
            "This LoRA classifier's base model was not loaded from a folder (it was built with "
            "Geneformer.from_config), so a saved adapter could not find it again. Save the "
            "model it was fine-tuned from (model.save('base')) and pass clf.save(folder, "
            "base='base'), or save the full classifier: clf.save(folder, merged=True)."
        )
    _load_base(base_folder, clf.vocab, adapter.base_sha256, "cannot be saved against it")
    folder = Path(folder)
    if (folder / ckpt.SAFETENSORS_NAME).is_file():
        raise ValueError(
            f"{str(folder)!r} holds a full model ({ckpt.SAFETENSORS_NAME}); a LoRA adapter "
            "saved beside it would leave transformers loading the old weights. Save the "
            "adapter into another folder, or save merged=True."
        )
    state = dict(adapter_parameters(clf))
    for prefix, module in clf._head_modules().items():
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    state = {PEFT_PREFIX + k: v for k, v in state.items()}
    base_abs = base_folder.resolve()
    try:
        relative = os.path.relpath(base_abs, folder.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        relative = None
    metadata = {
        **clf._metadata(),
        "format": ADAPTER_FORMAT,
        "adapter": {
            "type": "lora",
            **adapter.options.as_dict(),
            "freeze_layers": adapter.freeze_layers,
        },
        "base": {
            "folder": str(base_abs),
            "relative_folder": relative,
            "encoder_sha256": adapter.base_sha256,
        },
    }
    return ckpt.write_checkpoint(
        folder,
        clf._hf_config(),
        state,
        clf.vocab,
        metadata,
        weights_name=ADAPTER_WEIGHTS,
        extra_json={PEFT_CONFIG: _peft_config(clf, base_abs)},
    )


def _base_folder(folder: Path, recorded: Mapping[str, Any], base: str | os.PathLike | None) -> Path:
    """Find the base folder: ``base`` if given, else the recorded one, else the relative one."""
    if base is not None:
        return Path(base)
    candidates = [Path(recorded["folder"])] if recorded.get("folder") else []
    if recorded.get("relative_folder"):
        candidates.append(folder / recorded["relative_folder"])
    for candidate in candidates:
        if (candidate / ckpt.CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"The base model of the LoRA classifier in {str(folder)!r} is missing: it was "
        f"{' or '.join(repr(str(c)) for c in candidates) or 'not recorded'}. Pass "
        "GeneformerClassifier.from_pretrained(folder, base='where/it/is/now')."
    )


def _recorded_options(metadata: Mapping[str, Any], folder: Path) -> tuple[LoraOptions, int]:
    recorded = dict(metadata.get("adapter") or {})
    if recorded.pop("type", None) != "lora":
        raise ValueError(f"{ckpt.METADATA_NAME} in {str(folder)!r} records no LoRA adapter.")
    freeze_layers = int(recorded.pop("freeze_layers", 0))
    try:
        return LoraOptions(**recorded), freeze_layers
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"The LoRA adapter in {str(folder)!r} records options this version of "
            f"scgeneformer does not know ({err}); it was saved by a newer one: upgrade."
        ) from err


def _load_adapter_weights(
    clf: GeneformerClassifier, raw: Mapping[str, torch.Tensor], source: str
) -> None:
    expected = adapter_parameters(clf)
    found = {k for k in raw if ".lora_" in k}
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter weights {source!r} do not match the adapter its metadata describes "
            f"(missing: {missing[:4]}, unexpected: {unexpected[:4]}): the folder is damaged."
        )
    with torch.no_grad():
        for key, param in expected.items():
            if raw[key].shape != param.shape:
                raise ValueError(
                    f"Adapter weights {source!r}: {key} has shape {tuple(raw[key].shape)}, "
                    f"the recorded options imply {tuple(param.shape)}."
                )
            param.copy_(raw[key])


def load_adapter_folder(
    cls: type[GeneformerClassifier],
    folder: str | os.PathLike,
    vocab: Vocabulary | None,
    base: str | os.PathLike | None,
) -> GeneformerClassifier:
    """Load a LoRA classifier folder onto its base (see the module docstring)."""
    require_peft()
    folder = Path(folder)
    metadata = ckpt.read_json(folder / ckpt.METADATA_NAME, "Metadata")
    config = ckpt.read_json(folder / ckpt.CONFIG_NAME, "Model config")
    ckpt.verify_weights_file(folder, metadata)
    options, freeze_layers = _recorded_options(metadata, folder)
    if vocab is None:
        vocab = ckpt.find_vocabulary(folder, int(config.get("vocab_size", 0)))
    recorded_base = dict(metadata.get("base") or {})
    base_folder = _base_folder(folder, recorded_base, base)
    encoder = _load_base(
        base_folder, vocab, str(recorded_base.get("encoder_sha256")), "cannot be applied to it"
    )
    if metadata.get("vocabulary_sha256") not in (None, encoder.vocab.sha256):
        raise ValueError(
            f"The LoRA classifier in {str(folder)!r} was saved with vocabulary "
            f"{metadata.get('vocabulary_name')!r}, not with {encoder.vocab.name!r}."
        )
    clf = cls(
        encoder,
        list(metadata["classes"]),
        task=metadata["task"],
        classifier_dropout=config.get("classifier_dropout"),
        label_key=metadata.get("label_key"),
    )
    sha = recorded_base["encoder_sha256"]
    add_lora(clf, options, freeze_layers=freeze_layers, base_sha256=sha)
    weights = folder / ADAPTER_WEIGHTS
    raw = ckpt.read_weights_file(weights)
    ckpt.check_finite(raw, str(weights))
    raw = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    _load_adapter_weights(clf, raw, str(weights))
    clf._load_heads(raw, str(weights))
    clf.history = as_history(metadata.get("history") or {})
    clf.training_args = dict(metadata.get("training_args") or {})
    if config.get("tasks"):  # a multitask classifier's heads, saved as one linear layer
        from ._multitask import MultitaskClassifier

        clf = MultitaskClassifier.from_flat(clf, config["tasks"])
    return clf.float().eval()
