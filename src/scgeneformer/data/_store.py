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
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._atomic import atomic_folder
from .._genes import gene_names
from .._progress import progress_bar
from .._settings import settings
from .._version import __version__
from ..pp._chunks import count_source
from ..pp._gene_plan import plan_genes
from ..pp._medians import open_corpus_item
from ..pp._ranked_chunks import RankedChunk, iter_ranked_chunks, numba_threads, token_dtype
from ..vocab import Vocabulary

logger = logging.getLogger(__name__)

STORE_FORMAT = "scgeneformer-token-store"
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
TOKENS_NAME = "tokens.bin"
OFFSETS_NAME = "offsets.npy"
OBS_NAMES_NAME = "obs_names.npy"

StoreItem = AnnData | str | os.PathLike
_BYTES_PER_WORKER = 256 * 2**20
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


def _write_column(folder: Path, i: int, values: pd.Series) -> str:
    """Save one obs column without pickles; returns its kind."""
    stem = folder / f"{i:03d}"
    if isinstance(values.dtype, pd.CategoricalDtype):
        np.save(stem.with_suffix(".npy"), values.cat.codes.to_numpy())
        categories = values.cat.categories
        cats = categories.to_numpy()
        np.save(
            folder / f"{i:03d}.categories.npy",
            cats.astype(str) if categories.dtype == object else cats,
        )
        return "categorical"
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
        np.save(stem.with_suffix(".npy"), values.to_numpy())
        return "values"
    np.save(stem.with_suffix(".npy"), values.astype(str).to_numpy().astype(str))
    return "strings"


def _read_column(folder: Path, i: int, kind: str) -> Any:
    values = np.load(folder / f"{i:03d}.npy")
    if kind == "categorical":
        categories = np.load(folder / f"{i:03d}.categories.npy")
        return pd.Categorical.from_codes(values, categories=categories)
    return values


# ---------------------------------------------------------------------- building


@dataclass(frozen=True)
class _ShardJob:
    """Everything a worker needs to tokenize one corpus item into one shard."""

    item: Any
    shard_folder: str
    vocab: Vocabulary
    layer: str | None
    gene_key: str | None
    max_length: int
    obs_keys: tuple[str, ...]
    chunk_size: int
    n_threads: int


def _item_label(item: StoreItem) -> str:
    return "an in-memory AnnData" if isinstance(item, AnnData) else str(item)


def flat_with_specials(ranked: RankedChunk, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Cells of a ranked chunk end to end with ``<cls>``/``<eos>`` around each (if any).

    Cells without genes stay empty, as in ``obsm["geneformer_tokens"]``. Returns
    ``(flat, n_tokens)``.

    Examples
    --------
    >>> ranked = RankedChunk(np.array([0, 2, 2, 3]), np.array([7, 5, 9], dtype=np.uint16))
    >>> flat, n = flat_with_specials(ranked, vocab_v2)  # doctest: +SKIP
    >>> flat.tolist(), n.tolist()  # doctest: +SKIP
    ([2, 7, 5, 3, 2, 9, 3], [4, 0, 3])
    """
    n_genes = ranked.n_gene_tokens
    if not vocab.has_cls:
        return ranked.flat, n_genes
    n_tokens = np.where(n_genes > 0, n_genes + 2, 0)
    starts = np.cumsum(n_tokens) - n_tokens
    flat = np.empty(int(n_tokens.sum()), dtype=ranked.flat.dtype)
    within = np.arange(len(ranked.flat)) - np.repeat(ranked.offsets[:-1], n_genes)
    flat[np.repeat(starts, n_genes) + 1 + within] = ranked.flat
    filled = n_genes > 0
    flat[starts[filled]] = vocab.cls_id
    flat[starts[filled] + n_tokens[filled] - 1] = vocab.eos_id
    return flat, n_tokens


def _labelled_errors(chunks: Iterator[Any], label: str) -> Iterator[Any]:
    """Pass ``chunks`` through; a bad-counts error gains the corpus item's name."""
    try:
        yield from chunks
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from None


def _tokenize_item(job: _ShardJob) -> dict[str, Any]:
    """Tokenize one corpus item into a shard folder; returns its manifest entry.

    Runs in a worker process; warnings are returned for the parent to show.
    """
    folder = Path(job.shard_folder)
    (folder / "obs").mkdir(parents=True)
    label = _item_label(job.item)
    dtype = token_dtype(job.vocab)
    max_genes = job.max_length - (2 if job.vocab.has_cls else 0)
    with warnings.catch_warnings(record=True) as caught, open_corpus_item(job.item) as adata:
        warnings.simplefilter("always")
        missing = [k for k in job.obs_keys if k not in adata.obs.columns]
        if missing:
            raise KeyError(
                f"{label}: obs columns {missing} are absent; its obs columns are "
                f"{list(adata.obs.columns)}."
            )
        source = count_source(adata, job.layer)
        plan = plan_genes(gene_names(adata, job.gene_key), job.vocab, gene_key=job.gene_key)
        lengths = []
        with numba_threads(job.n_threads), open(folder / TOKENS_NAME, "wb") as fh:
            ranked_chunks = iter_ranked_chunks(
                source, plan, max_genes, dtype, adata.obs_names, chunk_size=job.chunk_size
            )
            for _, _, ranked in _labelled_errors(ranked_chunks, label):
                flat, n_tokens = flat_with_specials(ranked, job.vocab)
                flat.tofile(fh)
                lengths.append(n_tokens)
        n_tokens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(n_tokens) + 1, dtype=np.int64)
        np.cumsum(n_tokens, out=offsets[1:])
        np.save(folder / OFFSETS_NAME, offsets)
        np.save(folder / OBS_NAMES_NAME, np.asarray(adata.obs_names.astype(str)).astype(str))
        kinds = [
            _write_column(folder / "obs", i, adata.obs[key]) for i, key in enumerate(job.obs_keys)
        ]
    return {
        "folder": folder.name,
        "n_cells": len(n_tokens),
        "n_tokens": int(offsets[-1]),
        "n_cells_without_tokens": int((n_tokens == 0).sum()),
        "obs_kinds": kinds,
        "source": source_fingerprint(job.item),
        "warnings": [f"{label}: {w.message}" for w in caught],
    }


def source_fingerprint(item: StoreItem) -> dict[str, Any]:
    """Describe a corpus file by path, size and modification time (``None`` path for an AnnData).

    Examples
    --------
    >>> source_fingerprint("a.h5ad")  # doctest: +SKIP
    {'path': '/data/a.h5ad', 'size': 1048576, 'mtime_ns': 1764316800000000000}
    """
    if isinstance(item, AnnData):
        return {"path": None}
    path = Path(item).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def store_matches(
    folder: str | os.PathLike,
    items: Sequence[StoreItem],
    vocab: Vocabulary,
    **params: Any,
) -> bool:
    """Whether ``folder`` holds a complete store of exactly these files, tokenized this way.

    ``params`` are the build arguments recorded in the manifest (``layer``, ``gene_key``,
    ``max_length``, ``obs_keys``). In-memory AnnData objects never match.

    Examples
    --------
    >>> store_matches("store", ["a.h5ad", "b.h5ad"], vocab, max_length=2048)  # doctest: +SKIP
    True
    """
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    wanted = [source_fingerprint(item) for item in items]
    return (
        manifest.get("format") == STORE_FORMAT
        and manifest.get("vocabulary_sha256") == vocab.sha256
        and all(
            manifest.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in params.items()
        )
        and [s["source"] for s in manifest.get("shards", [])] == wanted
        and all(w["path"] is not None for w in wanted)
    )


def _as_store_items(data: StoreItem | Iterable[StoreItem]) -> list[StoreItem]:
    items = [data] if isinstance(data, AnnData | str | os.PathLike) else list(data)
    if not items:
        raise ValueError("The corpus is empty: give at least one h5ad path or AnnData.")
    for item in items:
        if not isinstance(item, AnnData) and not Path(item).is_file():
            raise FileNotFoundError(f"Corpus file {str(item)!r} does not exist.")
    return items


def build_token_store(
    data: StoreItem | Iterable[StoreItem],
    vocab: Vocabulary,
    folder: str | os.PathLike,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    max_length: int | None = None,
    obs_keys: Sequence[str] = (),
    chunk_size: int = 10_000,
    n_jobs: int | None = None,
    overwrite: bool = False,
) -> TokenStore:
    """Rank-value tokenize a corpus of h5ad files into an on-disk, memory-mapped token store.

    Each file becomes one shard. Files are opened backed and read in CSR row chunks, each
    chunk ranked by the same kernel as :func:`~scgeneformer.pp.rank_tokenize` (the tokens are
    identical) and appended to the shard's token file, so memory use is bounded by the chunk
    size, whatever the corpus size. ``n_jobs`` worker processes take one file each. The store
    appears atomically: it is built in a temporary folder and renamed into place at the end.

    Parameters
    ----------
    data
        h5ad paths (or in-memory AnnData objects, tokenized in this process).
    vocab
        The vocabulary; its name and sha256 are recorded.
    folder
        The store folder to create.
    layer, gene_key, max_length
        As in :func:`~scgeneformer.pp.rank_tokenize` (``max_length`` defaults to
        ``vocab.max_length``).
    obs_keys
        obs columns to keep with the tokens (numbers, booleans, categories or strings).
    chunk_size
        Cells read at a time.
    n_jobs
        Worker processes over files, at most one per file; the cores (``n_jobs``) are shared
        among them for the ranking kernel. By default ``sgf.settings.n_jobs``, but no more
        workers than one per 256 MiB of input: a worker takes seconds to start, so a small
        corpus is tokenized in this process. Workers are spawned, so a script that calls this
        needs the usual ``if __name__ == "__main__":`` guard.
    overwrite
        Replace an existing store at ``folder``.

    Returns
    -------
    The :class:`TokenStore`.

    Examples
    --------
    >>> from scgeneformer.data._store import build_token_store
    >>> store = build_token_store(["a.h5ad", "b.h5ad"], vocab, "corpus_store",
    ...                           obs_keys=["cell_type"], n_jobs=2)  # doctest: +SKIP
    >>> store.obs()["cell_type"].value_counts()  # doctest: +SKIP
    """
    items = _as_store_items(data)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{str(folder)!r} already exists; pass overwrite=True to replace it.")
    max_length = vocab.max_length if max_length is None else int(max_length)
    if max_length - (2 if vocab.has_cls else 0) < 1:
        raise ValueError(f"max_length={max_length} leaves no room for genes.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    obs_keys = tuple(str(k) for k in obs_keys)
    files = [Path(i) for i in items if not isinstance(i, AnnData)]
    total_threads = settings.n_jobs if n_jobs is None else int(n_jobs)
    n_workers = max(1, min(total_threads, len(files)))
    if n_jobs is None:
        # A worker process takes seconds to start (it imports torch, numba, anndata): only
        # start as many as the corpus size pays for.
        total_bytes = sum(f.stat().st_size for f in files)
        n_workers = max(1, min(n_workers, -(-total_bytes // _BYTES_PER_WORKER)))

    with atomic_folder(folder) as tmp:
        jobs = [
            _ShardJob(
                item=item,
                shard_folder=str(tmp / f"shard-{i:05d}"),
                vocab=vocab,
                layer=layer,
                gene_key=gene_key,
                max_length=max_length,
                obs_keys=obs_keys,
                chunk_size=int(chunk_size),
                n_threads=max(1, total_threads // n_workers),
            )
            for i, item in enumerate(items)
        ]
        shards = _run_jobs(jobs, n_workers)
        for shard in shards:
            for message in shard.pop("warnings"):
                warnings.warn(message, UserWarning, stacklevel=2)
        vocab.save(tmp / VOCAB_NAME)
        manifest = {
            "format": STORE_FORMAT,
            "format_version": 1,
            "scgeneformer_version": __version__,
            "vocabulary_name": vocab.name,
            "vocabulary_sha256": vocab.sha256,
            "vocabulary_size": len(vocab),
            "has_cls": vocab.has_cls,
            "token_dtype": token_dtype(vocab).name,
            "max_length": max_length,
            "layer": layer,
            "gene_key": gene_key,
            "obs_keys": list(obs_keys),
            "n_cells": sum(s["n_cells"] for s in shards),
            "n_tokens": sum(s["n_tokens"] for s in shards),
            "shards": shards,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    logger.info("Token store %s: %d cells in %d shards", folder, manifest["n_cells"], len(shards))
    return TokenStore(folder)


def _run_jobs(jobs: list[_ShardJob], n_workers: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    in_process = [i for i, job in enumerate(jobs) if isinstance(job.item, AnnData)]
    pooled = [i for i in range(len(jobs)) if i not in set(in_process)]
    bar = progress_bar(total=len(jobs), desc="token store", unit="files")
    with bar:
        for i in in_process:
            results[i] = _tokenize_item(jobs[i])
            bar.update(1)
        if n_workers == 1 or len(pooled) <= 1:
            for i in pooled:
                results[i] = _tokenize_item(jobs[i])
                bar.update(1)
        else:
            # Spawned, not forked: numba's and torch's thread pools are not fork-safe.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
                futures = {pool.submit(_tokenize_item, jobs[i]): i for i in pooled}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
    return [r for r in results if r is not None]


__all__ = ["FlatTokens", "TokenStore", "build_token_store", "flat_with_specials", "scan_tokens"]
