"""Writing tokens as Geneformer's tokenized data set (a ``datasets`` arrow folder).

The folder is what ``datasets.Dataset.save_to_disk`` writes and what Geneformer's own tools
read (``load_from_disk``): ``data-00000-of-00001.arrow`` (arrow IPC stream), ``state.json`` and
``dataset_info.json``, with an ``input_ids`` list column, ``length``, and the obs columns asked
for, as the official tokenizer's ``custom_attr_name_dict`` adds them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

DATA_FILE = "data-00000-of-00001.arrow"


def _feature(arrow_type, pa) -> dict:
    if pa.types.is_list(arrow_type):
        return {"feature": _feature(arrow_type.value_type, pa), "_type": "Sequence"}
    name = "string" if pa.types.is_string(arrow_type) else str(arrow_type)
    return {"dtype": name, "_type": "Value"}


def _obs_array(column: pd.Series, pa):
    if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype == object:
        return pa.array(column.astype(str).to_numpy(), type=pa.string())
    return pa.array(column.to_numpy())


def write_arrow_dataset(
    adata: AnnData,
    folder: str | os.PathLike,
    *,
    obs_keys: Sequence[str] = (),
    key: str = "geneformer",
) -> Path:
    """Write the cells' rank-value tokens as a Geneformer tokenized data set.

    Cells without tokens are left out (Geneformer's data sets hold none), with a warning.
    The folder is written beside its final place and renamed into it, so a crash never leaves
    half a data set. Pair it with the vocabulary the tokens were made with: a data set does
    not record it.

    Parameters
    ----------
    adata
        Cells tokenized by :func:`~scgeneformer.pp.rank_tokenize`.
    folder
        The data set folder to create; it must not exist.
    obs_keys
        Columns of ``obs`` to add (categories as strings), e.g. ``["cell_type", "donor"]``.
    key
        The tokenization's ``key_added``.

    Returns
    -------
    The folder.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=20, n_genes=200, random_state=0)
    >>> sgf.pp.rank_tokenize(adata, sgf.Vocabulary.build(adata))  # doctest: +SKIP
    >>> sgf.data.write_arrow_dataset(adata, "cells.dataset", obs_keys=["state"])  # doctest: +SKIP
    """
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the installation
        raise ModuleNotFoundError(
            "Writing arrow data sets needs pyarrow: pip install 'scgeneformer[arrow]'."
        ) from err
    if f"{key}_tokens" not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {key + '_tokens'!r}; run sgf.pp.rank_tokenize(adata, vocab) first."
        )
    missing = [k for k in obs_keys if k not in adata.obs.columns]
    if missing:
        raise KeyError(f"{missing} not in adata.obs; the columns are {list(adata.obs.columns)}.")
    reserved = {"input_ids", "length"} & set(obs_keys)
    if reserved:
        raise ValueError(f"obs_keys {sorted(reserved)} would overwrite the token columns.")
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{str(folder)!r} exists; give a new folder for the data set.")

    tokens = np.asarray(adata.obsm[f"{key}_tokens"])
    lengths = adata.obs[f"{key}_n_tokens"].to_numpy().astype(np.int64)
    keep = np.flatnonzero(lengths > 0)
    if len(keep) < adata.n_obs:
        warnings.warn(
            f"{adata.n_obs - len(keep):,} cells have no tokens and are left out of the data set.",
            UserWarning,
            stacklevel=2,
        )
    flat = tokens[keep][np.arange(tokens.shape[1])[None, :] < lengths[keep, None]]
    offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int32)
    columns = {
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int64))),
        "length": pa.array(lengths[keep]),
    }
    obs = adata.obs.iloc[keep]
    for name in obs_keys:
        columns[name] = _obs_array(obs[name], pa)
    table = pa.table(columns)

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with pa.OSFile(str(scratch / DATA_FILE), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=1000)
        features = {f.name: _feature(f.type, pa) for f in table.schema}
        info = {"citation": "", "description": "", "features": features, "homepage": ""}
        (scratch / "dataset_info.json").write_text(json.dumps(info, indent=2))
        state = {
            "_data_files": [{"filename": DATA_FILE}],
            "_fingerprint": adata.uns.get(key, {}).get("vocabulary_sha256", "")[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (scratch / "state.json").write_text(json.dumps(state, indent=2))
        scratch.rename(folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return folder
