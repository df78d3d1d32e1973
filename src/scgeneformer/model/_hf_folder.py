"""Reading and writing checkpoints in the Hugging Face folder layout.

A folder holds ``config.json`` (a transformers BERT config), the weights (``model.safetensors``,
or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``, possibly sharded with an
``*.index.json``), the vocabulary (our ``vocab.json``, or Geneformer's pickled dictionaries) and
our ``scgeneformer.json`` metadata. The metadata we write records the sha256 of the weights
file; loading checks it, so a damaged file, or the weights of one save beside the metadata of
another (a save into an existing folder killed halfway), is refused instead of used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._atomic import fsync_path, fsync_tree, honour_umask, staging_folder
from .._version import __version__
from ..vocab import Vocabulary
from ._config import GeneformerConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
VOCAB_NAME = "vocab.json"
METADATA_NAME = "scgeneformer.json"
METADATA_FORMAT = "scgeneformer-model"
# LoRA classifiers (model/_lora_folder.py) hold only adapters and heads, under peft's file name.
ADAPTER_FORMAT = "scgeneformer-lora-classifier"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# The files a save writes, in the order they replace an existing folder's: the metadata last,
# so that its weights sha256 tells whether the weights beside it are the ones it describes.
MODEL_FILES = (SAFETENSORS_NAME, CONFIG_NAME, VOCAB_NAME, METADATA_NAME)
# Saves into an existing folder stage inside it (``.scgeneformer-save.tmp-*``), never beside
# it: the folder's parent may not be writable, and renames within a folder never cross devices.
STAGING_NAME = "scgeneformer-save"

MLM_PREFIX = "cls.predictions."
# Keys of official checkpoints that carry nothing this encoder uses: non-persistent buffers
# saved by old transformers, and heads of other tasks (pooler, classifiers, NSP).
_IGNORED_PREFIXES = (
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
    "bert.pooler.",
    "classifier.",
    "cls.seq_relationship.",
    "qa_outputs.",
)
# Copies of tied parameters: the decoder weight is the word embedding matrix, and its bias is
# cls.predictions.bias (transformers ties both the same way when loading).
_TIED_COPIES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with an error that names the file when it is damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} does not hold a JSON object.")
    return data


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (weights files reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def verify_weights_file(folder: Path, metadata: Mapping[str, Any]) -> None:
    """Check the weights file against the sha256 the folder's metadata records, if it does.

    Folders written before the sha256 was recorded, and folders of other tools, pass as they
    are.

    Examples
    --------
    >>> verify_weights_file(Path("my_model"), {})  # nothing recorded: nothing to check
    """
    recorded = metadata.get("weights_sha256")
    if not recorded:
        return
    name = str(metadata.get("weights_file") or SAFETENSORS_NAME)
    if Path(name).name != name:  # a file of the folder, never a path elsewhere
        raise ValueError(
            f"{METADATA_NAME} in {str(folder)!r} names the weights file {name!r}, which is not "
            "a file name in the folder: the metadata is damaged or was edited."
        )
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{METADATA_NAME} in {str(folder)!r} describes the weights file {path.name!r}, which "
            "is missing: the folder is incomplete. Save or copy the model again."
        )
    found = file_sha256(path)
    if found != recorded:
        raise ValueError(
            f"Weights file {str(path)!r} does not match the sha256 recorded in {METADATA_NAME} "
            f"({found[:12]}… found, {recorded[:12]}… recorded): it is damaged, was replaced, or a "
            "save into this folder was interrupted and left the weights of one save beside the "
            "metadata of another. Save the model again, or copy it again from where it came from."
        )


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors.

    Examples
    --------
    >>> check_finite({"w": torch.ones(2)}, "model.safetensors")
    """
    bad = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ValueError(
            f"Checkpoint {source!r} holds NaN or inf in {_listing(bad)}: the training that made it "
            "diverged, or the file is damaged; every embedding would be NaN. Load an earlier "
            "checkpoint, or train again with a lower learning rate."
        )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_checked(path: Path, loader: Callable[[Path], Any]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} is missing; is the download complete?")
    try:
        state = loader(path)
    except Exception as err:  # any reader failure means the same thing to the user
        raise ValueError(
            f"Weights file {str(path)!r} is damaged, incomplete or not a plain tensor file "
            f"({type(err).__name__}: {err}). Download or save the checkpoint again."
        ) from err
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"Weights file {str(path)!r} does not hold a dict of tensors.")
    return dict(state)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load one safetensors file, with the errors of :func:`read_weights`."""
    return _load_checked(path, _load_safetensors)


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Load the weights of a checkpoint folder (safetensors preferred), with the file read."""
    candidates = (
        (SAFETENSORS_NAME, _load_safetensors),
        (BIN_NAME, _load_bin),
    )
    for name, loader in candidates:
        single = folder / name
        if single.is_file():
            return _load_checked(single, loader), single
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index, "Weights index").get("weight_map", {})
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_checked(folder / shard, loader))
            return state, index
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"No weights in {str(folder)!r}: expected {SAFETENSORS_NAME} or {BIN_NAME} "
        f"(or a sharded *.index.json); the folder holds {present}."
    )


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def match_state_dict(
    raw: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """Map a checkpoint's tensors onto the model's parameter names.

    Parameters
    ----------
    raw
        The checkpoint's tensors.
    expected
        Parameter name to shape of a model *with* an MLM head.
    source
        The file, for error messages.

    Returns
    -------
    The state dict to load, and whether the checkpoint has an MLM head (fine-tuned
    classification checkpoints do not).
    """
    state = dict(raw)
    if not any(k.startswith("bert.") for k in state) and any(
        k.startswith("embeddings.") for k in state
    ):
        # A bare BertModel checkpoint names its tensors without the "bert." prefix.
        state = {f"bert.{k}": v for k, v in state.items()}
    if MLM_PREFIX + "bias" not in state and _TIED_COPIES[1] in state:
        state[MLM_PREFIX + "bias"] = state[_TIED_COPIES[1]]
    state = {
        k: v
        for k, v in state.items()
        if k not in _TIED_COPIES and not k.startswith(_IGNORED_PREFIXES)
    }
    has_mlm_head = any(k.startswith(MLM_PREFIX) for k in state)
    wanted = {k for k in expected if has_mlm_head or not k.startswith(MLM_PREFIX)}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    problems = []
    if missing:
        problems.append(f"missing weights: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {_listing(unexpected)}")
    if problems:
        raise ValueError(
            f"Checkpoint {source!r} does not match its config.json: {'; '.join(problems)}. "
            "Is the config the one saved with these weights?"
        )
    wrong = [
        f"{k} {tuple(v.shape)} (config implies {tuple(expected[k])})"
        for k, v in state.items()
        if v.shape != expected[k]
    ]
    if wrong:
        raise ValueError(
            f"Checkpoint {source!r} has tensors of the wrong shape: {_listing(wrong)}."
        )
    return state, has_mlm_head


def _official_dictionaries(folder: Path) -> list[tuple[Path, Path, Path | None]]:
    """Pairs of Geneformer token/median pickles with the same suffix, plus a mapping if any."""
    found = []
    for token_path in sorted(folder.glob("token_dictionary*.pkl")):
        suffix = token_path.name[len("token_dictionary") :]
        median_path = folder / f"gene_median_dictionary{suffix}"
        mapping_path = folder / f"ensembl_mapping_dict{suffix}"
        if median_path.is_file():
            found.append(
                (token_path, median_path, mapping_path if mapping_path.is_file() else None)
            )
    return found


def find_vocabulary(folder: Path, vocab_size: int) -> Vocabulary | None:
    """Read the vocabulary stored beside the weights; None when there is none.

    ``vocab.json`` (ours) comes first; otherwise the official pickles
    ``token_dictionary*.pkl`` + ``gene_median_dictionary*.pkl`` (+ ``ensembl_mapping_dict*.pkl``).
    Where several official pairs lie there, the one of ``vocab_size`` tokens is taken.
    """
    for name in (VOCAB_NAME, VOCAB_NAME + ".gz"):
        if (folder / name).is_file():
            return Vocabulary.load(folder / name)
    vocabularies = [
        Vocabulary.from_geneformer(tokens, medians, mapping)
        for tokens, medians, mapping in _official_dictionaries(folder)
    ]
    if len(vocabularies) > 1:
        vocabularies = [v for v in vocabularies if len(v) == vocab_size] or vocabularies
    return vocabularies[0] if vocabularies else None


def _write_folder_contents(
    folder: Path,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    vocab: Vocabulary,
    metadata: Mapping[str, Any],
    weights_name: str,
    extra_json: Mapping[str, Mapping[str, Any]],
) -> None:
    from safetensors.torch import save_file

    weights = folder / weights_name
    save_file(dict(state), weights, metadata={"format": "pt"})
    honour_umask(weights)  # safetensors creates its files 0600
    metadata = {
        **metadata,
        "weights_file": weights_name,
        "weights_sha256": file_sha256(weights),
    }
    for name, content in {CONFIG_NAME: config, **extra_json}.items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    vocab.save(folder / VOCAB_NAME)
    (folder / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def write_checkpoint(
    folder: str | os.PathLike,
    config: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
    vocab: Vocabulary,
    metadata: Mapping[str, Any],
    *,
    weights_name: str = SAFETENSORS_NAME,
    extra_json: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint folder so that a reader never uses a partial one.

    ``metadata`` holds what is particular to the model (and may name another ``format``); the
    format, the package version, the vocabulary's name and sha256 and the weights file's sha256
    are added here, and the whole must be JSON-serialisable.
    The tensors are written from CPU copies, to ``weights_name``; ``extra_json`` names more
    JSON files to write beside the config (moved in before the metadata, as the rest).

    A new folder is written into a temporary folder beside it and appears by one rename. An
    existing folder (which may hold other files, such as training checkpoints) is written
    into a temporary folder inside it, then each file is moved by its own rename, weights first
    and metadata last: every file present is always complete, and a save killed between two
    renames leaves new weights beside old metadata, which loading refuses (the weights sha256
    differs). Nothing is written outside an existing folder, so its parent may be read-only.
    """
    metadata = {
        "format": METADATA_FORMAT,
        "format_version": 1,
        "scgeneformer_version": __version__,
        "vocabulary_name": vocab.name,
        "vocabulary_sha256": vocab.sha256,
        **metadata,
    }
    try:
        json.dumps(metadata)
    except TypeError as err:
        raise TypeError(f"training_args and history must be JSON-serialisable: {err}") from err
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    extra_json = dict(extra_json or {})
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} exists and is not a folder.")
    existing = folder.is_dir()
    # Not atomic_folder: a run's output_dir holds its checkpoints beside the model files.
    with staging_folder(folder / STAGING_NAME if existing else folder) as tmp:
        _write_folder_contents(tmp, config, state, vocab, metadata, weights_name, extra_json)
        fsync_tree(tmp)
        if not existing:
            tmp.rename(folder)
            fsync_path(folder.parent)
            return folder
        for name in (weights_name, *extra_json, *MODEL_FILES[1:]):
            os.replace(tmp / name, folder / name)
        fsync_path(folder)
        return folder


def read_folder(
    folder: Path, vocab: Vocabulary | None
) -> tuple[GeneformerConfig, Vocabulary, dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read and check a model folder: config, vocabulary, metadata, raw weights and their file.

    Everything that can be wrong with a folder is refused here, before a model is built: a
    missing config or vocabulary, a vocabulary of another size or sha256, or too long for the
    model's positions (a default-length one is fitted to them), weights that do not match the
    recorded sha256 or hold non-finite values.
    """
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        where = "does not exist" if not folder.exists() else f"has no {CONFIG_NAME}"
        raise FileNotFoundError(f"Checkpoint folder {str(folder)!r} {where}.")
    config = GeneformerConfig.from_hf_dict(read_json(folder / CONFIG_NAME, "Model config"))
    metadata_path = folder / METADATA_NAME
    metadata = read_json(metadata_path, "Metadata") if metadata_path.is_file() else {}
    if metadata.get("format") == ADAPTER_FORMAT:
        raise ValueError(
            f"{str(folder)!r} holds a LoRA classifier (adapters and heads, without the "
            "encoder they adapt): load it with sgf.GeneformerClassifier.from_pretrained, or "
            "merge it (clf.merge_adapter()) into a full model."
        )
    # Before the vocabulary checks: a folder mixed from two saves is named as that.
    verify_weights_file(folder, metadata)
    vocab = vocab if vocab is not None else find_vocabulary(folder, config.vocab_size)
    if vocab is None:
        raise FileNotFoundError(
            f"No vocabulary for the checkpoint in {str(folder)!r}. Put {VOCAB_NAME} "
            "(written by Vocabulary.save) or the official token_dictionary*.pkl and "
            "gene_median_dictionary*.pkl beside its config.json, or pass vocab=."
        )
    if len(vocab) != config.vocab_size:
        raise ValueError(
            f"The checkpoint in {str(folder)!r} has {config.vocab_size:,} token ids but the "
            f"vocabulary {vocab.name!r} has {len(vocab):,}: it is not the vocabulary the "
            "model was trained with."
        )
    # Refused or fitted here, before any tool writes tokens the model cannot read.
    vocab = vocab.fitted_to(
        config.max_position_embeddings,
        fix=f"Pass a vocabulary with max_length<={config.max_position_embeddings} "
        f"(vocab.max_length = {config.max_position_embeddings}).",
    )
    recorded = metadata.get("vocabulary_sha256")
    if recorded is not None and recorded != vocab.sha256:
        raise ValueError(
            f"The checkpoint in {str(folder)!r} was saved with vocabulary "
            f"{metadata.get('vocabulary_name')!r} (sha256 {recorded[:12]}…), not with "
            f"{vocab.name!r} (sha256 {vocab.sha256[:12]}…)."
        )
    raw, weights_path = read_weights(folder)
    check_finite(raw, str(weights_path))  # the heads too: classifiers load from raw
    return config, vocab, metadata, raw, weights_path
