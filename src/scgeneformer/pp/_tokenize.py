"""``pp.rank_tokenize``: Geneformer's rank-value encoding of each cell, into AnnData."""

from __future__ import annotations

import mmap
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from .._genes import gene_names
from .._progress import progress_bar
from .._settings import settings
from .._version import __version__
from ..vocab import Vocabulary
from ._chunks import count_source
from ._gene_plan import plan_genes
from ._rank_kernel import fill_padded
from ._ranked_chunks import RankedChunk, iter_ranked_chunks, numba_threads, token_dtype

TIE_RULE = "rank value descending; exact ties by token id ascending"


def _cell_totals(adata: AnnData, total_key: str | None) -> np.ndarray | None:
    if total_key is None:
        return None
    if total_key not in adata.obs.columns:
        raise KeyError(
            f"total_key={total_key!r} is not a column of adata.obs; leave total_key=None to use "
            "the sum of each cell's counts."
        )
    totals = pd.to_numeric(adata.obs[total_key], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(totals) & (totals > 0)):
        bad = adata.obs_names[~(np.isfinite(totals) & (totals > 0))][:3].tolist()
        raise ValueError(
            f"adata.obs[{total_key!r}] must be positive numbers (cell totals); not so for {bad}."
        )
    return totals


def zeros_on_small_pages(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """Return a zero-filled array in its own anonymous memory map, outside numpy's allocator.

    numpy advises the kernel to back large arrays with huge pages; where transparent huge
    pages are on "madvise" with "madvise" defrag (Ubuntu's default), a first write then may
    wait for the kernel to compact memory. Filling the token matrix measured 7x slower that
    way on our test machine. An anonymous map is zero-filled by the kernel and takes no
    such advice.

    Examples
    --------
    >>> zeros_on_small_pages((2, 3), np.dtype(np.uint16)).sum()
    np.uint64(0)
    """
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    buffer = mmap.mmap(-1, max(n_bytes, 1))
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def pad_rows(
    chunks: list[RankedChunk], vocab: Vocabulary, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Assemble ranked chunks into a right-padded token matrix, adding ``<cls>``/``<eos>``.

    Cells without any vocabulary gene keep an empty row (no special tokens either).
    Returns ``(tokens, n_tokens)``.
    """
    n_genes = np.concatenate([c.n_gene_tokens for c in chunks])
    lead = 1 if vocab.has_cls else 0
    n_tokens = np.where(n_genes > 0, n_genes + 2 * lead, 0)
    tokens = zeros_on_small_pages((len(n_genes), int(n_tokens.max(initial=0))), dtype)
    first_row = 0
    for chunk in chunks:
        fill_padded(chunk.flat, chunk.offsets, tokens, first_row, lead)
        first_row += len(chunk.offsets) - 1
    if vocab.has_cls:
        filled = np.flatnonzero(n_genes)
        tokens[filled, 0] = vocab.cls_id
        tokens[filled, n_genes[filled] + 1] = vocab.eos_id
    return tokens, n_tokens


def rank_tokenize(
    adata: AnnData,
    vocab: Vocabulary,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    total_key: str | None = None,
    max_length: int | None = None,
    key_added: str = "geneformer",
    chunk_size: int = 10_000,
    n_jobs: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Turn each cell into Geneformer's rank-value encoding: its genes, most informative first.

    For every gene of the vocabulary expressed in a cell, the rank value is
    ``count / total * 10,000 / median`` (``total``: the sum of all the cell's counts, or
    ``obs[total_key]``; ``median``: the gene's non-zero median over the pretraining corpus).
    Genes are ordered by it, highest first, and the top ones kept. Vocabularies with ``<cls>``
    and ``<eos>`` (Geneformer V2) get those around the genes. This is Geneformer's algorithm
    exactly; where Geneformer leaves exact ties to numpy's unstable sort, ties here go to the
    smaller token id, the same on every machine.

    The counts are read in CSR row chunks (in memory or backed, never densified) and ranked by
    a numba kernel on ``n_jobs`` threads. Genes whose identifiers map to the same vocabulary
    gene are summed, as Geneformer does.

    Parameters
    ----------
    adata
        Cells by genes, raw counts in ``X`` or ``layers[layer]``; may be backed.
    vocab
        The vocabulary (see :class:`~scgeneformer.Vocabulary`).
    layer
        Layer holding raw counts; default ``X``.
    gene_key
        Column of ``var`` holding gene identifiers; default ``var_names``.
    total_key
        Column of ``obs`` with each cell's total count (Geneformer's ``n_counts``); default:
        computed from the counts.
    max_length
        Tokens per cell at most, ``<cls>``/``<eos>`` included; default ``vocab.max_length``
        (2,048 for V1, 4,096 for V2).
    key_added
        Prefix of the result slots.
    chunk_size
        Cells per chunk.
    n_jobs
        Threads; default ``sgf.settings.n_jobs``.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes:

    ``obsm[f"{key_added}_tokens"]``
        Token ids, one row per cell, right-padded with ``<pad>`` = 0 (uint16 when the
        vocabulary fits).
    ``obs[f"{key_added}_n_tokens"]``
        Tokens per cell, special tokens included; 0 where no gene is in the vocabulary.
    ``var[f"{key_added}_token"]``
        Each gene's token id, -1 where it is not in the vocabulary.
    ``uns[key_added]``
        Parameters, the vocabulary's name and sha256, and counts of genes mapped.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=100, random_state=0)
    >>> vocab = sgf.Vocabulary.build(adata)
    >>> sgf.pp.rank_tokenize(adata, vocab)
    >>> bool(adata.obsm["geneformer_tokens"][0, 0] == vocab.cls_id)
    True
    """
    if copy and adata.isbacked:
        raise ValueError(
            "copy=True would load a backed AnnData into memory; use copy=False, which writes "
            "only the annotation slots, or load it with adata.to_memory() first."
        )
    source = count_source(adata, layer)
    if source.n_rows == 0:
        raise ValueError(
            "adata has no cells (n_obs == 0): nothing to tokenize. Check the selection that "
            "made it."
        )
    names = gene_names(adata, gene_key)
    max_length = vocab.max_length if max_length is None else int(max_length)
    max_genes = max_length - (2 if vocab.has_cls else 0)
    if max_genes < 1:
        raise ValueError(f"max_length={max_length} leaves no room for genes.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    totals = _cell_totals(adata, total_key)
    plan = plan_genes(names, vocab, gene_key=gene_key)
    dtype = token_dtype(vocab)

    chunks: list[RankedChunk] = []
    n_chunks = -(-source.n_rows // chunk_size)
    progress = progress_bar(
        total=source.n_rows,
        desc="rank_tokenize",
        unit="cells",
        enabled=settings.progress and n_chunks >= 2,
    )
    ranked_chunks = iter_ranked_chunks(
        source, plan, max_genes, dtype, adata.obs_names, chunk_size=chunk_size, totals=totals
    )
    with numba_threads(n_jobs), progress:
        for _, n_rows, ranked in ranked_chunks:
            chunks.append(ranked)
            progress.update(n_rows)
        tokens, n_tokens = pad_rows(chunks, vocab, dtype)

    empty = np.flatnonzero(n_tokens == 0)
    if len(empty):
        warnings.warn(
            f"{len(empty):,} of {len(n_tokens):,} cells express no vocabulary gene (e.g. "
            f"{adata.obs_names[empty[:3]].tolist()}); they are kept with no tokens "
            f"(obs['{key_added}_n_tokens'] == 0) and skipped downstream.",
            UserWarning,
            stacklevel=2,
        )

    target = adata.copy() if copy else adata
    target.obsm[f"{key_added}_tokens"] = tokens
    target.obs[f"{key_added}_n_tokens"] = n_tokens
    target.var[f"{key_added}_token"] = plan.column_token
    target.uns[key_added] = {
        "vocabulary_name": vocab.name,
        "vocabulary_sha256": vocab.sha256,
        "max_length": max_length,
        "has_cls": vocab.has_cls,
        "layer": "X" if layer is None else layer,
        "gene_key": "var_names" if gene_key is None else gene_key,
        "total_key": "sum of counts" if total_key is None else total_key,
        "n_genes": len(names),
        "n_genes_mapped": plan.n_mapped,
        "n_vocabulary_genes_present": plan.n_tokens,
        "n_cells_without_tokens": len(empty),
        "tie_rule": TIE_RULE,
        "scgeneformer_version": __version__,
    }
    return target if copy else None
