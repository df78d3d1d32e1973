"""An on-disk token store: rank-value tokens of a corpus in memory-mapped shards.

Layout of a store folder::

    manifest.json           format, vocabulary (name, sha256), token dtype, cells, shards
    vocab.json              the vocabulary (Vocabulary.save)
    shard-00000/
        tokens.bin          every cell's tokens end to end, raw uint16 (int32 for vocabularies
                            above 65,536 ids), <cls>/<eos> included where the vocabulary has them
        offsets.npy         int64, cells + 1: cell i is tokens[offsets[i]:offsets[i + 1]]
        obs_names.npy       cell names (unicode)
        obs/000.npy ...     kept obs columns (values, or category codes + 000.categories.npy)

One shard per input file. Tokens are written chunk by chunk as a file is read, so neither a
file nor the corpus is ever held in memory whole; readers memory-map the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..vocab import Vocabulary

logger = logging.getLogger(__name__)

STORE_FORMAT = "scgeneformer-token-store"
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
TOKENS_NAME = "tokens.bin"
OFFSETS_NAME = "offsets.npy"
OBS_NAMES_NAME = "obs_names.npy"

# Tokens read at a time by :func:`scan_tokens`: bounds its memory on a memory-mapped corpus.
_SCAN_TOKENS = 2**24


def scan_tokens(
    chunks: Iterable[np.ndarray], lengths: np.ndarray, vocab: Vocabulary, where: str
) -> str:
    """Check every token id against ``vocab`` and hash the cells, in one pass over the data.

    The hash (blake2b) covers the cell lengths and the tokens in cell order, as ``uint16``
    (``int32`` for vocabularies above 65,536 ids), so equal cells give equal hashes whether
    they come from an AnnData, a token store or an arrow data set; reordered cells do not.

    Parameters
    ----------
    chunks
        The cells' tokens end to end (no padding), in pieces.
    lengths
        Tokens per cell.
    vocab
        The model's vocabulary (:meth:`~scgeneformer.Vocabulary.check_tokens`).
    where
        The source, for messages.

    Returns
    -------
    The hex digest.

    Examples
    --------
    >>> len(scan_tokens([np.array([5, 9, 7])], np.array([2, 1]), vocab, "two cells"))
    32
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(lengths, dtype="<i8"))
    dtype = np.dtype("<u2") if len(vocab) <= 2**16 else np.dtype("<i4")
    for chunk in chunks:
        vocab.check_tokens(chunk, where=where)
        digest.update(np.ascontiguousarray(chunk, dtype=dtype))
    return digest.hexdigest()


class FlatTokens:
    """Cells stored end to end: parts of ``(flat tokens, offsets)``, read as padded batches.

    Each part holds ``offsets[i + 1] - offsets[i]`` tokens for its cell ``i`` at
    ``flat[offsets[i]:offsets[i + 1]]`` (offsets may start above 0, as in arrow list
    columns). Parts are typically memory-mapped files, so only the rows asked for are read.

    Parameters
    ----------
    parts
        ``(flat, offsets)`` pairs; cells are numbered across parts in order.
    description
        What the tokens are, for messages.

    Examples
    --------
    >>> src = FlatTokens([(np.array([5, 6, 7, 8, 9]), np.array([0, 2, 5]))], "two cells")
    >>> src.padded(np.array([1, 0])).tolist()
    [[7, 8, 9], [5, 6, 0]]
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray]], description: str) -> None:
        self._parts = [(flat, np.asarray(offsets, dtype=np.int64)) for flat, offsets in parts]
        self.description = description
        self.lengths = np.concatenate(
            [np.diff(offsets) for _, offsets in self._parts] or [np.zeros(0, np.int64)]
        )
        counts = [len(offsets) - 1 for _, offsets in self._parts]
        self._first_cell = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def parts(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``(flat, offsets)`` pairs, e.g. to combine sources into one."""
        return list(self._parts)

    def padded(self, indices: np.ndarray) -> np.ndarray:
        """Tokens of the cells ``indices`` as a right-padded ``(cells, longest)`` int64 array."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        out = np.zeros((len(indices), int(lengths.max(initial=0))), dtype=np.int64)
        part_of = np.searchsorted(self._first_cell[1:], indices, side="right")
        for part in np.unique(part_of):
            rows = np.flatnonzero(part_of == part)
            flat, offsets = self._parts[part]
            lens = lengths[rows]
            starts = offsets[indices[rows] - self._first_cell[part]]
            # One gather of every wanted token: each cell's start plus 0..len-1.
            within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            values = np.asarray(flat[np.repeat(starts, lens) + within])
            block = np.zeros((len(rows), out.shape[1]), dtype=np.int64)
            block[np.arange(out.shape[1]) < lens[:, None]] = values
            out[rows] = block
        return out

    def max_token(self) -> int:
        """Largest token id stored (-1 when there are none); reads every part once."""
        return max((int(flat.max()) for flat, _ in self._parts if len(flat)), default=-1)

    def scan(self, vocab: Vocabulary) -> str:
        """Refuse ids outside ``vocab`` and return the hash of the cells (:func:`scan_tokens`).

        Only each part's cells are read (an arrow chunk's buffer may hold more).
        """

        def chunks() -> Iterator[np.ndarray]:
            for flat, offsets in self._parts:
                first, last = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
                for start in range(first, last, _SCAN_TOKENS):
                    yield np.asarray(flat[start : min(start + _SCAN_TOKENS, last)])

        return scan_tokens(chunks(), self.lengths, vocab, self.description)


# ---------------------------------------------------------------------- reading


class TokenStore(FlatTokens):
    """A token store folder written by :func:`build_token_store`, memory-mapped.

    Parameters
    ----------
    folder
        The store folder.

    Attributes
    ----------
    manifest
        The parsed ``manifest.json``.
    lengths
        Tokens per cell (special tokens included; 0 for cells with no vocabulary gene).

    Examples
    --------
    >>> store = TokenStore("corpus_store")  # doctest: +SKIP
    >>> len(store), store.vocabulary_name  # doctest: +SKIP
    (1200000, 'geneformer-v2')
    >>> batch = store.padded(np.arange(8))  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{str(self.folder)!r} is not a token store: it has no {MANIFEST_NAME}."
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Token store manifest {str(manifest_path)!r} is damaged: {err}"
            ) from err
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"{str(manifest_path)!r} is not a scgeneformer token store manifest.")
        self.manifest = manifest
        try:
            dtype = np.dtype(manifest["token_dtype"])
            shards = [
                (s["folder"], int(s["n_cells"]), int(s["n_tokens"])) for s in manifest["shards"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"Token store manifest {str(manifest_path)!r} is incomplete ({type(err).__name__}: "
                f"{err}). Build the store again."
            ) from err
        parts = [
            self._open_shard(self.folder / name, n_cells, n_tokens, dtype)
            for name, n_cells, n_tokens in shards
        ]
        super().__init__(parts, f"token store {str(self.folder)!r}")

    @staticmethod
    def _open_shard(
        where: Path, n_cells: int, n_tokens: int, dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """Memory-map one shard after checking it against its manifest entry."""
        rebuild = "Build the store again (build_token_store(..., overwrite=True))."
        tokens_path = where / TOKENS_NAME
        try:
            offsets = np.load(where / OFFSETS_NAME, mmap_mode="r")
            size = tokens_path.stat().st_size
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Token store shard {str(where)!r} is missing or unreadable ({type(err).__name__}: "
                f"{err}): the store is incomplete or damaged. {rebuild}"
            ) from err
        if (
            offsets.ndim != 1
            or len(offsets) != n_cells + 1
            or int(offsets[0]) != 0
            or int(offsets[-1]) != n_tokens
            or bool((np.diff(offsets) < 0).any())
        ):
            raise ValueError(
                f"Token store shard {str(where)!r} does not match the manifest (its offsets are "
                f"not {n_cells + 1} rising values from 0 to {n_tokens}). {rebuild}"
            )
        if size != n_tokens * dtype.itemsize:
            raise ValueError(
                f"Token store file {str(tokens_path)!r} has {size} bytes, not the "
                f"{n_tokens * dtype.itemsize} the manifest implies; it is truncated or damaged. "
                f"{rebuild}"
            )
        # np.memmap refuses empty files; an empty shard needs no mapping.
        flat = (
            np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
            if n_tokens
            else np.zeros(0, dtype)
        )
        return flat, offsets

    @property
    def vocabulary_sha256(self) -> str:
        """sha256 of the vocabulary the tokens were made with."""
        return str(self.manifest["vocabulary_sha256"])

    @property
    def vocabulary_name(self) -> str:
        """Name of that vocabulary."""
        return str(self.manifest["vocabulary_name"])

    @property
    def vocabulary(self) -> Vocabulary:
        """The vocabulary itself, read from the store and checked against the manifest."""
        vocab = Vocabulary.load(self.folder / VOCAB_NAME)
        if vocab.sha256 != self.vocabulary_sha256:
            raise ValueError(
                f"{str(self.folder / VOCAB_NAME)!r} holds vocabulary {vocab.name!r} (sha256 "
                f"{vocab.sha256[:12]}…), not the {self.vocabulary_name!r} (sha256 "
                f"{self.vocabulary_sha256[:12]}…) the tokens were made with; the store was "
                "edited or mixed up. Build it again."
            )
        return vocab

    def cell(self, index: int) -> np.ndarray:
        """Tokens of one cell (no padding)."""
        row = self.padded(np.array([index]))[0]
        return row[: self.lengths[index]]

    def obs(self) -> pd.DataFrame:
        """Cell names and the obs columns kept, over all shards, in cell order."""
        frames = []
        columns = self.manifest["obs_keys"]
        for shard in self.manifest["shards"]:
            where = self.folder / shard["folder"]
            names = np.load(where / OBS_NAMES_NAME)
            data = {
                key: _read_column(where / "obs", i, kind)
                for i, (key, kind) in enumerate(zip(columns, shard["obs_kinds"], strict=True))
            }
            frames.append(pd.DataFrame(data, index=pd.Index(names.astype(str))))
        if not frames:
            return pd.DataFrame(columns=columns)
        out = pd.concat(frames)
        for key in columns:
            parts = [frame[key] for frame in frames]
            if all(isinstance(p.dtype, pd.CategoricalDtype) for p in parts):
                # Shards may know different categories; keep the column categorical.
                out[key] = pd.api.types.union_categoricals(parts, ignore_order=True)
        return out

    def __repr__(self) -> str:
        return (
            f"TokenStore({str(self.folder)!r}: {len(self):,} cells, "
            f"{len(self.manifest['shards'])} shards, vocabulary {self.vocabulary_name!r})"
        )


# ---------------------------------------------------------------------- obs columns


def _read_column(folder: Path, i: int, kind: str) -> Any:
    values = np.load(folder / f"{i:03d}.npy")
    if kind == "categorical":
        categories = np.load(folder / f"{i:03d}.categories.npy")
        return pd.Categorical.from_codes(values, categories=categories)
    return values
