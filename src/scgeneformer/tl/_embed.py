"""``tl.embed``: cell (and gene) embeddings into AnnData, ready for scanpy."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from anndata import AnnData

from ..model import Geneformer, GeneformerClassifier
from ..train._optim import resolve_device_dtype
from ._inference import check_pooling, encode_cells, hidden_layer_index
from ._model_arg import encoder_of
from ._tokens import TOKENS_KEY, cell_tokens


def embed(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    key_added: str = "X_geneformer",
    layer: int = -1,
    pooling: str = "mean",
    genes: bool = False,
    batch_tokens: int | None = None,
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
    adata
        Cells; tokens in ``obsm["geneformer_tokens"]`` or raw counts to make them from.
    model
        A :class:`~scgeneformer.Geneformer`, or a
        :class:`~scgeneformer.GeneformerClassifier` (its encoder is used); tokens made with
        another vocabulary are refused.
    key_added
        Where the cell embeddings go in ``obsm`` (and gene embeddings in ``varm``).
    layer
        As Geneformer's ``emb_layer``: -1 (default) the second-to-last layer, 0 the last,
        down to ``-num_layers`` (the embedding layer).
    pooling
        ``"mean"``: average of the gene tokens (``<cls>`` and ``<eos>`` excluded);
        ``"cls"``: the ``<cls>`` token (V2-style vocabularies only).
    genes
        Also write gene embeddings: each gene's contextual embedding averaged over the cells
        where it occurs, into ``varm[key_added]`` (NaN where it never occurs), with those cell
        counts in ``var[f"{key_added}_n_cells"]``.
    batch_tokens
        Tokens per batch (default ``sgf.settings.token_budget``); lower it if memory runs out.
    device, dtype
        Default ``sgf.settings`` ("auto": CUDA with bfloat16 when present, else CPU float32).
        The model is moved to ``device``.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes ``obsm[key_added]`` (float32, NaN rows
    for cells without tokens), optionally ``varm[key_added]`` and ``var[f"{key_added}_n_cells"]``,
    and the parameters in ``uns[key_added]``.

    Examples
    --------
    >>> import scanpy as sc, scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=200, random_state=0)
    >>> vocab = sgf.Vocabulary.build(adata)
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> sgf.tl.embed(adata, model)
    >>> sc.pp.neighbors(adata, use_rep="X_geneformer")
    """
    model = encoder_of(model)
    hidden_layer_index(model, layer)  # refuse bad arguments before touching adata
    check_pooling(model, pooling)
    target = adata.copy() if copy else adata
    device_, dtype_ = resolve_device_dtype(device, dtype)
    tokens, n_tokens = cell_tokens(target, model)
    encoded = encode_cells(
        model,
        tokens,
        n_tokens,
        layer=layer,
        pooling=pooling,
        device=device_,
        dtype=dtype_,
        token_budget=batch_tokens,
        genes=genes,
    )
    empty = int((n_tokens == 0).sum())
    if empty:
        warnings.warn(
            f"{empty:,} cells have no tokens; their rows of obsm[{key_added!r}] are NaN. Drop "
            f"them (adata.obs['{TOKENS_KEY}_n_tokens'] == 0) before sc.pp.neighbors.",
            UserWarning,
            stacklevel=2,
        )
    target.obsm[key_added] = encoded.cells
    if genes:
        var_token = target.var[f"{TOKENS_KEY}_token"].to_numpy()
        safe = np.maximum(var_token, 0)
        counts = np.where(var_token >= 0, encoded.gene_count[safe], 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = encoded.gene_sum[safe] / counts[:, None]
        means[counts == 0] = np.nan
        target.varm[key_added] = means.astype(np.float32)
        target.var[f"{key_added}_n_cells"] = counts
    target.uns[key_added] = {
        "layer": int(layer),
        "pooling": pooling,
        "genes": bool(genes),
        "model_preset": model.preset or "custom",
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "vocabulary_sha256": model.vocab.sha256,
        "n_cells_without_tokens": empty,
        "device": str(device_),
        "dtype": str(dtype_).removeprefix("torch."),
    }
    return target if copy else None
