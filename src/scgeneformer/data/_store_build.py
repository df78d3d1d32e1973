"""Building a token store: each input file tokenized chunk by chunk into its own shard.

The layout is described in ``_store``; shards are written by worker processes, one file each,
and the folder appears whole or not at all.
"""

from __future__ import annotations

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
from ._store import (
    MANIFEST_NAME,
    OBS_NAMES_NAME,
    OFFSETS_NAME,
    STORE_FORMAT,
    TOKENS_NAME,
    VOCAB_NAME,
    FlatTokens,
    TokenStore,
    scan_tokens,
)

logger = logging.getLogger(__name__)

StoreItem = AnnData | str | os.PathLike
_BYTES_PER_WORKER = 256 * 2**20


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
    >>> from scgeneformer.data._store_build import build_token_store
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
