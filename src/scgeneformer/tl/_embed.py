"""``tl.embed``: cell (and gene) embeddings into AnnData, ready for scanpy."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData

from .._deprecation import renamed_keywords
from .._docs import (
    doc_adata_tokens,
    doc_copy,
    doc_device_dtype,
    doc_emb_layer,
    doc_params,
    doc_pooling,
    doc_token_budget,
)
from .._plan import execution_plan
from .._slots import check_key_added, n_tokens_slot, table_to_var, var_tokens
from ..data._batching import check_token_budget
from ..model import Geneformer, GeneformerClassifier
from ._inference import check_pooling, encode_cells, hidden_layer_index
from ._model_arg import encoder_of
from ._tokens import cell_tokens


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
@doc_params(
    adata=doc_adata_tokens,
    emb_layer=doc_emb_layer,
    pooling=doc_pooling,
    token_budget=doc_token_budget,
    device_dtype=doc_device_dtype,
    copy=doc_copy,
)
def embed(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    key_added: str = "X_geneformer",
    emb_layer: int = -1,
    pooling: str = "mean",
    genes: bool = False,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed every cell with a Geneformer model, in input order.

    Runs the encoder on each cell's rank-value tokens (made with the model's vocabulary by
    :func:`~scgeneformer.pp.rank_tokenize`, which runs first if the tokens are absent), stops
    at the layer read, and pools its hidden states. The result chains into scanpy:
    ``sc.pp.neighbors(adata, use_rep="X_geneformer")``, ``sc.tl.umap``, ``sc.tl.leiden``.

    Parameters
    ----------
    {adata}
    model
        A :class:`~scgeneformer.Geneformer`, or a
        :class:`~scgeneformer.GeneformerClassifier` (its encoder is used); tokens made with
        another vocabulary are refused.
    key_added
        Where the cell embeddings go in ``obsm`` (and gene embeddings in ``varm``).
    {emb_layer}
    {pooling}
    genes
        Also write gene embeddings: each gene's contextual embedding averaged over the cells
        where it occurs, into ``varm[key_added]`` (NaN where it never occurs), with those cell
        counts in ``var[f"{key_added}_n_cells"]``.
    {token_budget}
    {device_dtype}
    {copy}

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes ``obsm[key_added]`` (float32, NaN rows
    for cells without tokens), optionally ``varm[key_added]`` and ``var[f"{key_added}_n_cells"]``,
    and the parameters and ``"execution_plan"`` in ``uns[key_added]``.

    Examples
    --------
    >>> import scanpy as sc, scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=200, random_state=0)
    >>> vocab = sgf.Vocabulary.build(adata, max_length=2048)
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> sgf.tl.embed(adata, model)
    >>> sc.pp.neighbors(adata, use_rep="X_geneformer")
    """
    model = encoder_of(model)
    # refuse bad arguments before touching adata
    check_key_added(
        key_added,
        {
            "obsm": [key_added],
            "varm": [key_added],
            "var": [f"{key_added}_n_cells"],
            "uns": [key_added],
        },
        tool="tl.embed",
    )
    hidden_layer_index(model, emb_layer)
    check_pooling(model, pooling)
    check_token_budget(token_budget)
    target = adata.copy() if copy else adata
    plan = execution_plan(device, dtype)
    tokens, n_tokens = cell_tokens(target, model)
    encoded = encode_cells(
        model,
        tokens,
        n_tokens,
        emb_layer=emb_layer,
        pooling=pooling,
        plan=plan,
        token_budget=token_budget,
        genes=genes,
    )
    empty = int((n_tokens == 0).sum())
    if empty:
        warnings.warn(
            f"{empty:,} cells have no tokens; their rows of obsm[{key_added!r}] are NaN. Drop "
            f"them (adata.obs['{n_tokens_slot()}'] == 0) before sc.pp.neighbors.",
            UserWarning,
            stacklevel=2,
        )
    target.obsm[key_added] = encoded.cells
    if genes:
        var_token = var_tokens(target)
        counts = table_to_var(var_token, encoded.gene_count, 0).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = table_to_var(var_token, encoded.gene_sum) / counts[:, None]
        means[counts == 0] = np.nan
        target.varm[key_added] = means.astype(np.float32)
        target.var[f"{key_added}_n_cells"] = counts
    target.uns[key_added] = {
        "emb_layer": int(emb_layer),
        "pooling": pooling,
        "genes": bool(genes),
        "model_preset": model.preset or "custom",
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "vocabulary_sha256": model.vocab.sha256,
        "n_cells_without_tokens": empty,
        "device": str(plan.device),
        "dtype": plan.dtype_name,
        "execution_plan": plan.as_dict(),
    }
    return target if copy else None
