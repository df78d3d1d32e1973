"""Token sources for training, and how a run's batches are split among processes.

A source has ``lengths`` (tokens per cell) and ``padded(indices)`` (a right-padded int64 batch).
Three kinds exist: an AnnData's token slots (:class:`PaddedTokens`), an on-disk token store
(:class:`~scgeneformer.data.TokenStore`) and Geneformer's own tokenized data sets
(Hugging Face ``datasets`` arrow folders with an ``input_ids`` column,
:func:`read_arrow_dataset`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from anndata import AnnData

from ..train._distributed import Distributed
from ..vocab import Vocabulary
from ._batching import token_budget_batches
from ._store import FlatTokens, TokenStore, scan_tokens
from ._store_build import build_token_store, store_matches

if TYPE_CHECKING:
    from ..model import Geneformer

_SHUFFLE_TAG = 0x5EED  # keeps the batch-order stream apart from other streams of one seed


class TokenSource(Protocol):
    """What training reads: cell lengths and padded batches of cells."""

    lengths: np.ndarray
    description: str

    def __len__(self) -> int: ...

    def padded(self, indices: np.ndarray) -> np.ndarray:
        """Tokens of the cells ``indices``, right-padded with 0, as int64."""
        ...

    def scan(self, vocab: Vocabulary) -> str:
        """Refuse ids outside ``vocab``; return a hash of the cells' tokens (one pass)."""
        ...


class PaddedTokens:
    """Cells in a right-padded token matrix, e.g. ``obsm["geneformer_tokens"]``.

    Examples
    --------
    >>> src = PaddedTokens(np.array([[5, 6, 0], [7, 8, 9]]), np.array([2, 3]), "two cells")
    >>> src.padded(np.array([0])).tolist()
    [[5, 6]]
    """

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, description: str) -> None:
        self._tokens = tokens
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.description = description

    def __len__(self) -> int:
        return len(self.lengths)

    def padded(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices``, cut to their longest cell, as int64."""
        indices = np.asarray(indices, dtype=np.int64)
        width = int(self.lengths[indices].max(initial=0))
        return np.asarray(self._tokens[indices, :width], dtype=np.int64)

    def scan(self, vocab: Vocabulary) -> str:
        """Refuse ids outside ``vocab``; return the cells' hash (``_store.scan_tokens``).

        Each row is read up to its length, so an AnnData and a token store of the same cells
        hash alike.
        """
        rows = max(1, 2**24 // max(self._tokens.shape[1], 1))

        def chunks() -> Iterator[np.ndarray]:
            for start in range(0, len(self), rows):
                block = np.asarray(self._tokens[start : start + rows])
                lengths = self.lengths[start : start + rows]
                yield block[np.arange(block.shape[1]) < lengths[:, None]]

        return scan_tokens(chunks(), self.lengths, vocab, self.description)


# ---------------------------------------------------------------------- arrow data sets


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.ipc  # the submodule is not imported by pyarrow itself
    except ImportError as err:
        raise ImportError(
            "Reading Geneformer's tokenized (arrow) data sets needs pyarrow: "
            "pip install 'scgeneformer[arrow]'."
        ) from err
    return pa


def is_arrow_dataset(folder: Path) -> bool:
    """Tell whether ``folder`` looks like a ``datasets.Dataset.save_to_disk`` folder.

    Examples
    --------
    >>> is_arrow_dataset(Path("genecorpus_30M_2048.dataset"))  # doctest: +SKIP
    True
    """
    return folder.is_dir() and (
        (folder / "state.json").is_file()
        or (folder / "dataset_info.json").is_file()
        or any(folder.glob("*.arrow"))
    )


def _arrow_files(folder: Path) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ValueError(
            f"{str(folder)!r} holds a DatasetDict with splits {splits}; give one split's "
            f"folder, e.g. {str(folder / splits[0]) if splits else '<folder>/train'!r}."
        )
    state = folder / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} holds no .arrow data files.")
    return files


def _read_arrow_table(path: Path):
    pa = _pyarrow()
    # Memory-mapped, so the token buffers are views of the file, not copies in memory.
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).read_all()  # what datasets writes
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def read_arrow_dataset(folder: str | os.PathLike) -> FlatTokens:
    """Open a Geneformer tokenized data set (a ``datasets`` arrow folder) for training.

    Reads the ``input_ids`` column of the folder's ``data-*.arrow`` files (arrow IPC stream
    format, as ``Dataset.save_to_disk`` writes it; the file format is read too), in the order
    ``state.json`` lists them, memory-mapped. Geneformer V2 data sets already hold ``<cls>``
    and ``<eos>``; pair each with the vocabulary it was tokenized with (the data sets do not
    record it, so only the token range can be checked).

    Parameters
    ----------
    folder
        The data set folder (one split).

    Returns
    -------
    A :class:`~scgeneformer.data.FlatTokens` source.

    Examples
    --------
    >>> src = read_arrow_dataset("genecorpus_30M_2048.dataset")  # doctest: +SKIP
    >>> src.padded(np.arange(4)).shape  # doctest: +SKIP
    (4, 2048)
    """
    pa = _pyarrow()
    folder = Path(folder)
    parts = []
    for path in _arrow_files(folder):
        table = _read_arrow_table(path)
        if "input_ids" not in table.column_names:
            raise ValueError(
                f"{str(path)!r} has no input_ids column (columns: {table.column_names}); "
                "is it a Geneformer tokenized data set?"
            )
        column = table.column("input_ids")
        value_type = getattr(column.type, "value_type", None)
        if value_type is None or not pa.types.is_integer(value_type):
            raise ValueError(
                f"input_ids in {str(path)!r} must be lists of integers, not {column.type}."
            )
        for chunk in column.chunks:
            # Offsets index the chunk's whole value buffer (also for sliced chunks). The
            # numpy views keep their arrow buffers, and so the memory maps, alive.
            values = chunk.values.to_numpy(zero_copy_only=True)
            parts.append((values, chunk.offsets.to_numpy()))
    return FlatTokens(parts, f"arrow data set {str(folder)!r}")


# ---------------------------------------------------------------------- opening a corpus


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def open_corpus(
    data: AnnData | str | os.PathLike | Sequence[str | os.PathLike],
    model: Geneformer,
    *,
    store_folder: str | os.PathLike,
    ctx: Distributed,
    require_existing_store: bool = False,
    n_jobs: int | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
) -> TokenSource:
    """Turn what a user gives to ``tl.pretrain`` into one token source, checked against ``model``.

    Parameters
    ----------
    data
        An AnnData's tokens (:class:`PaddedTokens`, which :func:`scgeneformer.tl.pretrain`
        reads from its slots); or paths:
        h5ad files (tokenized into a store at ``store_folder``, by rank 0, reused when it
        already holds exactly these files), token-store folders and arrow data set folders.
    model
        Tokens must come from its vocabulary and fit its positions.
    store_folder
        Where h5ad files are tokenized to.
    ctx
        The process group (rank 0 builds the store, the others wait).
    require_existing_store
        Refuse to (re)build the store: a resumed run must see the data it started with.
    n_jobs
        Worker processes for building the store.
    layer, gene_key
        Where the h5ad files hold their counts and gene ids, as in
        :func:`~scgeneformer.pp.rank_tokenize`.

    Returns
    -------
    The source; cells in the order given.

    Examples
    --------
    >>> ctx = setup_distributed(torch.device("cpu"))  # doctest: +SKIP
    >>> source = open_corpus(["a.h5ad", "b.h5ad"], model, store_folder="run/token_store",
    ...                      ctx=ctx)  # doctest: +SKIP
    >>> source.padded(np.arange(2)).shape  # doctest: +SKIP
    (2, 2048)
    """
    if isinstance(data, PaddedTokens):
        return data

    items = [data] if isinstance(data, str | os.PathLike) else list(data)
    if not all(isinstance(p, str | os.PathLike) for p in items):
        raise TypeError(
            "Give one AnnData, or paths (h5ad files, token stores, arrow data sets); got a "
            f"list holding {sorted({type(p).__name__ for p in items})}."
        )
    paths = [Path(p) for p in items]
    if not paths:
        raise ValueError("The corpus is empty: give an AnnData, h5ad paths or a store folder.")
    h5ads = [p for p in paths if p.is_file()]
    # Sources in the order given; the h5ad files share one store, at the place of the first.
    pieces: list[FlatTokens] = []
    for path in paths:
        if path.is_file():
            if path == h5ads[0]:
                pieces.append(
                    _h5ad_store(
                        h5ads,
                        model,
                        Path(store_folder),
                        ctx,
                        require_existing_store,
                        {"n_jobs": n_jobs, "layer": layer, "gene_key": gene_key},
                    )
                )
        elif _is_store(path):
            pieces.append(TokenStore(path))
        elif is_arrow_dataset(path):
            # Its ids are checked by the source's scan, once for the whole corpus.
            pieces.append(read_arrow_dataset(path))
        elif not path.exists():
            raise FileNotFoundError(f"Corpus path {str(path)!r} does not exist.")
        else:
            raise ValueError(
                f"{str(path)!r} is a folder but neither a token store (manifest.json) nor an "
                "arrow data set (state.json / *.arrow)."
            )
    _check_store_vocabularies([p for p in pieces if isinstance(p, TokenStore)], model)
    parts = [part for piece in pieces for part in piece.parts]
    described = [piece.description for piece in pieces]
    source = FlatTokens(parts, ", ".join(described))
    if len(source) == 0:
        raise ValueError(f"The corpus is empty: {source.description} hold no cells.")
    longest = int(source.lengths.max())
    if longest > model.max_length:
        raise ValueError(
            f"{source.description} hold cells of {longest} tokens, more than the model's "
            f"{model.max_length} positions; tokenize with max_length<={model.max_length}."
        )
    return source


def _h5ad_store(
    paths: list[Path],
    model: Geneformer,
    folder: Path,
    ctx: Distributed,
    require_existing: bool,
    options: dict[str, Any],
) -> TokenStore:
    """Tokenize h5ad files into the run's store (rank 0), or reuse it if it holds them.

    ``options`` are ``n_jobs`` and the ``layer`` and ``gene_key`` the store must be made with.
    """
    max_length = min(model.vocab.max_length, model.max_length)
    made_with = {"layer": options["layer"], "gene_key": options["gene_key"]}

    def build() -> None:
        if store_matches(folder, paths, model.vocab, max_length=max_length, **made_with):
            return
        if require_existing:
            raise ValueError(
                f"The token store {str(folder)!r} does not hold these h5ad files tokenized "
                "with the model's vocabulary (files changed since the checkpoint?); a resumed "
                "run must see the data it started with. Start a new run in another output_dir."
            )
        build_token_store(
            paths,
            model.vocab,
            folder,
            max_length=max_length,
            n_jobs=options["n_jobs"],
            overwrite=True,
            **made_with,
        )

    ctx.on_main(build, "building the token store")
    return TokenStore(folder)


def _check_store_vocabularies(stores: list[TokenStore], model: Geneformer) -> None:
    for store in stores[1:]:
        if store.vocabulary_sha256 != stores[0].vocabulary_sha256:
            raise ValueError(
                f"{stores[0].description} was tokenized with vocabulary "
                f"{stores[0].vocabulary_name!r} (sha256 {stores[0].vocabulary_sha256[:12]}…) but "
                f"{store.description} with {store.vocabulary_name!r} (sha256 "
                f"{store.vocabulary_sha256[:12]}…); one corpus needs one vocabulary."
            )
    for store in stores:
        model.check_tokens_vocabulary(store.vocabulary_sha256, store.vocabulary_name)


# ---------------------------------------------------------------------- batches per process


def gene_counts(lengths: np.ndarray, has_cls: bool) -> np.ndarray:
    """Gene tokens per cell: its tokens less ``<cls>`` and ``<eos>`` where the vocabulary has them.

    Examples
    --------
    >>> gene_counts(np.array([0, 5, 12]), has_cls=True).tolist()
    [0, 3, 10]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.where(lengths > 0, lengths - (2 if has_cls else 0), 0)


def epoch_batches(
    cells: np.ndarray,
    lengths: np.ndarray,
    epoch: int,
    *,
    token_budget: int | None,
    padded: bool,
    seed: int,
) -> list[np.ndarray]:
    """One epoch's batches of ``cells``: length-grouped to a token budget, in shuffled order.

    Cells are permuted (so cells of equal length meet different partners each epoch), cut by
    :func:`~scgeneformer.data.token_budget_batches`, and the batches shuffled. The result
    depends only on ``(seed, epoch)``, never on the number of processes; the number of
    batches is the same every epoch.

    Examples
    --------
    >>> b = epoch_batches(np.arange(6), np.array([3, 9, 4, 4, 8, 2]), 0, token_budget=10,
    ...                   padded=True, seed=0)
    >>> sorted(np.concatenate(b).tolist())
    [0, 1, 2, 3, 4, 5]
    """
    rng = np.random.default_rng([int(seed), int(epoch), _SHUFFLE_TAG])
    cells = rng.permutation(np.asarray(cells, dtype=np.int64))
    batches = [cells[b] for b in token_budget_batches(lengths[cells], token_budget, padded=padded)]
    return [batches[i] for i in rng.permutation(len(batches))]


def rank_batches(step_in_epoch: int, world_size: int, accumulation: int, rank: int) -> list[int]:
    """Return the batches (indices) of one optimisation step that process ``rank`` computes.

    A step consumes ``world_size * accumulation`` consecutive batches of the epoch; rank r
    takes every ``world_size``-th of them from the r-th on. Any split of the same product
    (2 processes x 1, 1 process x 2 accumulated) trains on the same global batch.

    Examples
    --------
    >>> rank_batches(3, world_size=2, accumulation=2, rank=1)
    [13, 15]
    """
    first = step_in_epoch * world_size * accumulation
    return [first + a * world_size + rank for a in range(accumulation)]


__all__ = [
    "PaddedTokens",
    "TokenSource",
    "epoch_batches",
    "gene_counts",
    "is_arrow_dataset",
    "open_corpus",
    "rank_batches",
    "read_arrow_dataset",
]
