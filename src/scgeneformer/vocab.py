"""The gene vocabulary: token ids, non-zero medians, special tokens and gene-ID mapping."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from ._atomic import write_text_atomic
from ._geneformer_dicts import PathOrDict, check_token_ids, read_geneformer_dicts
from ._genes import normalize_gene_id, resolve_gene_ids

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
V1_SPECIAL_TOKENS = {PAD: 0, MASK: 1}
V2_SPECIAL_TOKENS = {PAD: 0, MASK: 1, CLS: 2, EOS: 3}
_FORMAT = "scgeneformer-vocabulary"
_FORMAT_VERSION = 1

DEFAULT_MAX_LENGTH = 2048
logger = logging.getLogger(__name__)


class Vocabulary:
    """Genes, their token ids and non-zero medians, as used by rank-value tokenization.

    A vocabulary fixes which genes a model knows (one token id each), the special tokens
    (``<pad>``, ``<mask>`` and, for Geneformer V2-style models, ``<cls>`` and ``<eos>``), the
    non-zero median of each gene's CP10k-normalised counts over a corpus (the divisor in the
    rank value), and optionally a mapping from other identifiers (symbols, old Ensembl IDs) to
    the vocabulary's canonical IDs.

    Its :attr:`sha256` identifies the token ids, medians and special tokens; tokens made with
    one vocabulary are refused by a model that carries another.

    Parameters
    ----------
    gene_tokens
        Canonical gene ID (Ensembl, upper case) to token id.
    medians
        Canonical gene ID to its non-zero median; must cover every gene in ``gene_tokens``.
    special_tokens
        Special token name to id; must hold ``<pad>`` = 0 and ``<mask>``.
    mapping
        Optional identifier (symbol, alias, other Ensembl ID) to canonical gene ID.
    name
        A short human-readable name.
    max_length
        Tokens per cell, special tokens included (the model's input size). Left out, it is
        2,048 and a model with fewer positions fits it to its own (see
        :attr:`max_length_given`).

    Attributes
    ----------
    max_length_given
        Whether ``max_length`` was chosen by the user (or recorded in a saved file) rather
        than left at its default. A model refuses a vocabulary whose chosen ``max_length``
        exceeds its positions; a default one it fits to them, with a log note.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> vocab = sgf.Vocabulary({"ENSG1": 2, "ENSG2": 3}, {"ENSG1": 1.5, "ENSG2": 0.7})
    >>> len(vocab), vocab.has_cls
    (4, False)
    """

    def __init__(
        self,
        gene_tokens: Mapping[str, int],
        medians: Mapping[str, float],
        *,
        special_tokens: Mapping[str, int] | None = None,
        mapping: Mapping[str, str] | None = None,
        name: str = "custom",
        max_length: int | None = None,
    ) -> None:
        special = dict(V1_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if special.get(PAD) != 0 or MASK not in special:
            raise ValueError(
                f"special_tokens must map '{PAD}' to 0 and contain '{MASK}'; got {special}."
            )
        if (CLS in special) != (EOS in special):
            raise ValueError(f"special_tokens must hold both '{CLS}' and '{EOS}', or neither.")
        check_token_ids(gene_tokens)
        check_token_ids(special)
        genes = sorted(gene_tokens, key=lambda g: int(gene_tokens[g]))
        tokens = np.array([int(gene_tokens[g]) for g in genes], dtype=np.int64)
        all_ids = np.concatenate([tokens, np.array(list(special.values()), dtype=np.int64)])
        if len(np.unique(all_ids)) != len(all_ids) or (all_ids < 0).any():
            raise ValueError("Token ids must be distinct non-negative integers across all tokens.")
        missing = [g for g in genes if g not in medians]
        if missing:
            raise ValueError(
                f"{len(missing)} vocabulary genes have no median, e.g. {missing[:3]}. "
                "Is the median dictionary the one that belongs to this token dictionary?"
            )
        median_values = np.array([float(medians[g]) for g in genes], dtype=np.float64)
        bad = ~np.isfinite(median_values) | (median_values <= 0)
        if bad.any():
            examples = [genes[i] for i in np.flatnonzero(bad)[:3]]
            raise ValueError(f"Gene medians must be positive and finite; not so for {examples}.")
        min_length = 3 if CLS in special else 1
        self.max_length_given = max_length is not None
        max_length = DEFAULT_MAX_LENGTH if max_length is None else max_length
        if int(max_length) < min_length:
            raise ValueError(f"max_length must be at least {min_length}, got {max_length}.")

        self._genes = genes
        self._tokens = tokens
        self._medians = median_values
        self._special = special
        self._mapping = (
            None
            if mapping is None
            else {normalize_gene_id(k): normalize_gene_id(v) for k, v in mapping.items()}
        )
        self.name = str(name)
        self.max_length = int(max_length)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_geneformer(
        cls,
        token_dict: PathOrDict,
        median_dict: PathOrDict,
        mapping_dict: PathOrDict | Sequence[PathOrDict] | None = None,
        *,
        name: str | None = None,
        max_length: int | None = None,
        repo_id: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Vocabulary:
        """Read the official Geneformer dictionaries, from files or from the hub.

        The pickles are read through a restricted unpickler that admits only dicts of strings
        and numbers; anything else is refused. V1 (``<pad>`` = 0, ``<mask>`` = 1) and V2 (adds
        ``<cls>`` = 2, ``<eos>`` = 3) are told apart by the special tokens present.

        Parameters
        ----------
        token_dict
            ``token_dictionary_gc104M.pkl`` (V2) or ``token_dictionary_gc30M.pkl`` (V1), or the
            dict itself.
        median_dict
            The matching ``gene_median_dictionary_*.pkl``, or the dict.
        mapping_dict
            Optional identifier mapping(s): ``ensembl_mapping_dict_*.pkl`` (Ensembl IDs, symbols
            and aliases to canonical IDs) and/or ``gene_name_id_dict_*.pkl`` (symbols to
            Ensembl IDs). With several, the first that knows an identifier wins.
        name
            Defaults to ``geneformer-v1`` or ``geneformer-v2``.
        max_length
            Defaults to the official model input sizes: 2,048 (V1) and 4,096 (V2).
        repo_id
            A Hugging Face repository (e.g. the official ``ctheodoris/Geneformer``): the
            dictionaries are then file names in it (in ``subfolder``), fetched through
            ``huggingface_hub`` (``pip install 'scgeneformer[hub]'``) into its cache. Without
            it nothing is downloaded.
        subfolder, revision, cache_dir, local_files_only
            As in ``huggingface_hub.hf_hub_download``: the folder in the repository (e.g.
            ``geneformer``), a branch, tag or commit, the cache folder, and offline use of
            the cache only (also ``HF_HUB_OFFLINE=1``).

        Returns
        -------
        The vocabulary.

        Examples
        --------
        >>> vocab = sgf.Vocabulary.from_geneformer(
        ...     "token_dictionary_gc104M.pkl",
        ...     "gene_median_dictionary_gc104M.pkl",
        ...     "ensembl_mapping_dict_gc104M.pkl",
        ... )  # doctest: +SKIP
        >>> vocab = sgf.Vocabulary.from_geneformer(
        ...     "token_dictionary_gc104M.pkl",
        ...     "gene_median_dictionary_gc104M.pkl",
        ...     repo_id="ctheodoris/Geneformer",
        ...     subfolder="geneformer",
        ... )  # doctest: +SKIP
        """
        genes, medians, special, mapping = read_geneformer_dicts(
            token_dict,
            median_dict,
            mapping_dict,
            repo_id=repo_id,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )
        is_v2 = CLS in special
        default_name = "geneformer-v2" if is_v2 else "geneformer-v1"
        vocab = cls(
            genes,
            medians,
            special_tokens=special,
            mapping=mapping,
            name=name or default_name,
            max_length=max_length or (4096 if is_v2 else 2048),
        )
        vocab.max_length_given = max_length is not None
        return vocab

    @classmethod
    def build(
        cls,
        data: AnnData | str | os.PathLike | Iterable[AnnData | str | os.PathLike],
        *,
        layer: str | None = None,
        gene_key: str | None = None,
        mapping: Mapping[str, str] | None = None,
        min_cells: int = 1,
        special_tokens: Mapping[str, int] | None = None,
        name: str = "custom",
        max_length: int | None = None,
        chunk_size: int = 10_000,
        tmp_dir: str | os.PathLike | None = None,
    ) -> Vocabulary:
        """Build a vocabulary and exact non-zero medians from a corpus.

        Each cell's counts are normalised to 10,000 (CP10k: count / cell total x 10,000, the
        cell total summing all of its genes); a gene's median is exactly ``numpy.median`` of its
        non-zero CP10k values over all cells of the corpus. The corpus is streamed in row chunks
        (h5ad paths are opened backed) and the values are spilled to a temporary memory-mapped
        file, so it need not fit in memory.

        Parameters
        ----------
        data
            An AnnData, an h5ad path, or a list of them.
        layer
            Layer holding raw counts (default ``X``).
        gene_key
            Column of ``var`` with gene IDs (default ``var_names``).
        mapping
            Optional identifier to canonical ID mapping, applied before counting; genes mapping
            to one ID are summed.
        min_cells
            Keep genes expressed in at least this many cells.
        special_tokens
            Defaults to the V2 set (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``).
        name
            See :class:`Vocabulary`.
        max_length
            Tokens per cell; default 4,096 (Geneformer V2's input size), which a model with
            fewer positions (V1-10M: 2,048) fits to its own with a log note. A value given
            here is kept, and a model too small for it refuses the vocabulary.
        chunk_size
            Cells read at a time.
        tmp_dir
            Where to spill values (default: the system's temporary folder).

        Returns
        -------
        The vocabulary; genes take ids after the special tokens, in sorted ID order.

        Examples
        --------
        >>> adata = sgf.datasets.synthetic_states(n_cells=200, random_state=0)
        >>> vocab = sgf.Vocabulary.build(adata, name="synthetic")
        >>> vocab.has_cls
        True
        """
        from .pp._medians import corpus_nonzero_medians

        special = dict(V2_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        genes, medians = corpus_nonzero_medians(
            data,
            layer=layer,
            gene_key=gene_key,
            mapping=mapping,
            min_cells=min_cells,
            chunk_size=chunk_size,
            tmp_dir=tmp_dir,
        )
        first = max(special.values()) + 1
        gene_tokens = {g: first + i for i, g in enumerate(genes)}
        vocab = cls(
            gene_tokens,
            dict(zip(genes, medians, strict=True)),
            special_tokens=special,
            mapping=mapping,
            name=name,
            max_length=4096 if max_length is None else max_length,
        )
        vocab.max_length_given = max_length is not None
        return vocab

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (gzip-compressed when the name ends in ``.gz``).

        Examples
        --------
        >>> vocab.save("my_vocab.json")  # doctest: +SKIP
        """
        path = Path(path)
        payload = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "name": self.name,
            "max_length": self.max_length,
            "max_length_given": self.max_length_given,
            "sha256": self.sha256,
            **self._identity_payload(),
            "mapping": self._mapping,
        }
        write_text_atomic(path, json.dumps(payload))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`, checking its sha256.

        Examples
        --------
        >>> vocab = sgf.Vocabulary.load("my_vocab.json")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Vocabulary file {str(path)!r} does not exist.")
        try:
            if path.suffix == ".gz":
                with gzip.open(path, "rt", encoding="utf-8") as fh:
                    payload = json.load(fh)
            else:
                payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(
                f"Vocabulary file {str(path)!r} is not readable JSON ({err}); is it truncated?"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a scgeneformer vocabulary file.")
        vocab = cls(
            dict(zip(payload["genes"], payload["tokens"], strict=True)),
            dict(zip(payload["genes"], payload["medians"], strict=True)),
            special_tokens=payload["special_tokens"],
            mapping=payload.get("mapping"),
            name=payload["name"],
            max_length=payload["max_length"],
        )
        # Files written before the flag existed: their length counts as chosen.
        vocab.max_length_given = bool(payload.get("max_length_given", True))
        if vocab.sha256 != payload.get("sha256"):
            raise ValueError(
                f"Vocabulary file {str(path)!r} does not match its recorded sha256; "
                "it was altered or damaged."
            )
        return vocab

    def fitted_to(self, positions: int, *, fix: str) -> Vocabulary:
        """Return this vocabulary, or a copy with ``max_length`` cut to a model's ``positions``.

        A vocabulary longer than the model's position table is cut only when its
        ``max_length`` is a default (:attr:`max_length_given` False), with a log note; a
        chosen one is refused. The copy has the same sha256: tokens made with either are
        the same tokens, only truncated sooner.

        Parameters
        ----------
        positions
            The model's ``max_position_embeddings``.
        fix
            What the user can do instead, for the refusal.

        Examples
        --------
        >>> vocab = Vocabulary({"ENSG1": 2}, {"ENSG1": 1.0})
        >>> vocab.max_length, vocab.fitted_to(256, fix="").max_length
        (2048, 256)
        """
        if self.max_length <= positions:
            return self
        if self.max_length_given:
            raise ValueError(
                f"The vocabulary {self.name!r} tokenizes cells to {self.max_length} tokens "
                f"(max_length={self.max_length} was chosen), more than the model's "
                f"{positions} positions. {fix}"
            )
        fitted = copy.copy(self)
        fitted.max_length = int(positions)
        logger.info(
            "The vocabulary %r tokenizes to %d tokens by default; the model has %d positions, "
            "so its copy of the vocabulary (model.vocab) tokenizes to %d. Tokenize with "
            "model.vocab (the tools do when the tokens are absent).",
            self.name,
            self.max_length,
            positions,
            positions,
        )
        return fitted

    def _identity_payload(self) -> dict[str, Any]:
        return {
            "special_tokens": dict(sorted(self._special.items(), key=lambda kv: kv[1])),
            "genes": list(self._genes),
            "tokens": self._tokens.tolist(),
            "medians": self._medians.tolist(),
        }

    # ------------------------------------------------------------------ identity
    @cached_property
    def sha256(self) -> str:
        """Hex sha256 of the token ids, medians and special tokens (not of name or mapping)."""
        canonical = json.dumps(self._identity_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.sha256 == other.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        kind = "with <cls>/<eos>" if self.has_cls else "without <cls>/<eos>"
        return (
            f"Vocabulary({self.name!r}: {self.n_genes:,} genes, {kind}, "
            f"max_length={self.max_length}, sha256={self.sha256[:12]}…)"
        )

    # ------------------------------------------------------------------ lookups
    @property
    def size(self) -> int:
        """Number of token ids (largest id + 1): the model's vocabulary size."""
        return int(max(self._tokens.max(initial=0), max(self._special.values()))) + 1

    @property
    def n_genes(self) -> int:
        """Number of gene tokens."""
        return len(self._genes)

    @property
    def genes(self) -> list[str]:
        """Canonical gene IDs, in token-id order."""
        return list(self._genes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name to id."""
        return dict(self._special)

    @property
    def mapping(self) -> dict[str, str] | None:
        """Identifier to canonical gene ID mapping, if any."""
        return None if self._mapping is None else dict(self._mapping)

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (always 0)."""
        return self._special[PAD]

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>``."""
        return self._special[MASK]

    @property
    def has_cls(self) -> bool:
        """Whether cells start with ``<cls>`` and end with ``<eos>`` (Geneformer V2 style)."""
        return CLS in self._special

    @property
    def cls_id(self) -> int | None:
        """Id of ``<cls>``, or None."""
        return self._special.get(CLS)

    @property
    def eos_id(self) -> int | None:
        """Id of ``<eos>``, or None."""
        return self._special.get(EOS)

    @property
    def max_genes(self) -> int:
        """Gene tokens per cell at most: :attr:`max_length` less ``<cls>`` and ``<eos>``."""
        return self.max_length - (2 if self.has_cls else 0)

    @property
    def gene_token_ids(self) -> np.ndarray:
        """Token ids of the genes, aligned with :attr:`genes`."""
        return self._tokens.copy()

    @cached_property
    def token_dict(self) -> dict[str, int]:
        """Canonical gene ID to token id (genes only)."""
        return dict(zip(self._genes, self._tokens.tolist(), strict=True))

    @cached_property
    def median_by_token(self) -> np.ndarray:
        """Gene median indexed by token id; NaN for special and unused ids."""
        out = np.full(self.size, np.nan)
        out[self._tokens] = self._medians
        return out

    @cached_property
    def gene_by_token(self) -> np.ndarray:
        """Canonical gene ID indexed by token id; the token name for special tokens."""
        out = np.full(self.size, "", dtype=object)
        out[self._tokens] = self._genes
        for token, idx in self._special.items():
            out[idx] = token
        return out

    def resolve(self, names: Iterable[str]) -> list[str | None]:
        """Canonical vocabulary ID of each name (via the mapping), or None where unknown.

        Examples
        --------
        >>> vocab.resolve(["ENSG00000141510.17", "not-a-gene"])  # doctest: +SKIP
        ['ENSG00000141510', None]
        """
        return resolve_gene_ids(names, self.token_dict, self._mapping)

    def tokens_for(self, names: Iterable[str]) -> np.ndarray:
        """Token id of each gene name, -1 where it is not in the vocabulary.

        Examples
        --------
        >>> vocab = Vocabulary({"ENSG1": 2}, {"ENSG1": 1.0})
        >>> vocab.tokens_for(["ensg1", "ENSG9"]).tolist()
        [2, -1]
        """
        lookup = self.token_dict
        return np.array(
            [-1 if g is None else lookup[g] for g in self.resolve(names)], dtype=np.int64
        )

    def check_tokens(self, tokens: Any, *, where: str | None = None) -> None:
        """Refuse token ids that are not integers inside this vocabulary (0 .. size - 1).

        The one check every entry point of tokens uses (AnnData slots, token stores, arrow
        data sets, the model's forward): an id out of range would otherwise fail deep inside
        the embedding lookup (on CUDA as a device-side assert that poisons the process).

        Parameters
        ----------
        tokens
            A numpy array or torch tensor of ids (any shape); min and max are taken where
            it lives, so a tensor on the GPU costs one synchronisation.
        where
            Where the tokens come from, for the message.

        Examples
        --------
        >>> vocab.check_tokens(np.array([[2, 3, 0]]))
        >>> vocab.check_tokens(np.array([[2, 99]]), where="my tokens")
        Traceback (most recent call last):
        ...
        ValueError: Token ids outside the model's vocabulary 'custom' (0..51) in my tokens, e.g. [99]. Were the tokens made with another vocabulary?
        """  # noqa: E501 - a doctest's expected output is one line
        if not hasattr(tokens, "dtype"):  # lists and other sequences
            tokens = np.asarray(tokens)
        in_where = f" in {where}" if where else ""
        if not _integer_dtype(tokens.dtype):
            raise ValueError(
                f"Token ids{in_where} must be integers, got {tokens.dtype}; make them with "
                "sgf.pp.rank_tokenize (or a token store) instead of by hand."
            )
        empty = tokens.numel() == 0 if hasattr(tokens, "numel") else tokens.size == 0
        if empty or (tokens.min() >= 0 and tokens.max() < self.size):
            return
        bad = tokens[(tokens < 0) | (tokens >= self.size)]
        raise ValueError(
            f"Token ids outside the model's vocabulary {self.name!r} (0..{self.size - 1})"
            f"{in_where}, e.g. {bad[:3].tolist()}. Were the tokens made with another vocabulary?"
        )


def _integer_dtype(dtype: Any) -> bool:
    """Whether a numpy or torch dtype holds integers (not floats, complex numbers or booleans)."""
    if isinstance(dtype, np.dtype):
        return bool(np.issubdtype(dtype, np.integer))
    # A torch dtype, told apart without importing torch here.
    return not (dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool")


__all__ = ["CLS", "EOS", "MASK", "PAD", "Vocabulary"]
