"""``tl.in_silico_delete`` and ``tl.in_silico_overexpress``: which genes move cells toward a goal.

This module is the tools' signatures and documentation; the work is in ``_screen``
(arguments), ``_screen_run`` (cells, statistics, slots) and ``_variants`` (the perturbed
token lists, embedded and scored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anndata import AnnData

from .._deprecation import renamed_keywords
from ..model import Geneformer, GeneformerClassifier
from ._screen_run import screen

_DELETION_PARAMETERS = """    n_exact
        Candidates per cell deleted exactly with ``method="two_stage"``, chosen in two
        rounds (see Notes). Default 32: the smallest of 10, 16, 24, 32, 40, 48, 64 whose
        candidates held at least 95% of each cell's exact top 10 with fine-tuned classifiers
        at 256 tokens per cell, on synthetic states and on Kang 2018 (0.96 and 0.98; 24 held
        0.95 and 0.96); see ``bench/RESULTS.md``.
    n_background
        Random rank-matched genes per cell, besides the candidates, deleted exactly with
        ``method="two_stage"`` as the null of the statistics (default ``n_exact // 4``).
    gene_shifts
        Also record, for every exact deletion, how far each other gene of the cell moves:
        ``1 - cos`` of that gene's own hidden state at ``layer``, original against variant
        (Geneformer's ``cell_and_gene`` mode). Needs ``"exact"`` or ``"two_stage"`` (whose
        exact stage it covers); refused with ``"first_order"``.
    anchor_gene
        Also delete this gene together with each other gene deleted exactly, in the start
        cells that have it (Geneformer's combinations with an anchor). The interaction
        ``combined - (anchor alone + gene alone)`` is positive when the pair moves the cell
        further than the two deletions' separate effects added up (synergy), negative when
        less (redundancy). Needs ``"exact"`` or ``"two_stage"``.
"""

_SHARED_PARAMETERS = """
    Parameters
    ----------
    adata
        Cells; tokens in ``obsm["geneformer_tokens"]`` or raw counts to make them from.
    model
        The classifier from :func:`~scgeneformer.tl.finetune` on ``state_key`` (its encoder
        is screened), or a :class:`~scgeneformer.Geneformer`. A model never fine-tuned on
        the states gets a warning: its embedding need not separate them.
    state_key
        Column of ``obs`` with cell states; without it the score is the magnitude
        ``1 - cos(variant, original)``.
    start_state
        The state whose cells are perturbed (e.g. the disease state).
    goal_state
        The state to move toward (e.g. healthy); its embedding is the exact mean of its
        cells' embeddings.
    alt_states
        Other states to report shifts toward (``var[f"{key_added}_shift_{state}"]``).
    genes
        ``"all"`` (every gene of each cell) or a list of genes (vocabulary IDs or mapped
        symbols).
    method
        ``"exact"`` builds and embeds every variant (``L`` forwards of length ``L`` per
        cell). ``"first_order"`` (deletion only) estimates every gene's score from gradient
        passes alone (one of the cell and, toward a state, one of three copies of it with the
        positions moved), through a gate on each token as an attention
        key and in the pooling plus the effect of moving the later genes one place (see
        Notes); no variant is built. ``"two_stage"`` (deletion
        only) runs the first-order pass, then deletes exactly each cell's ``n_exact``
        candidates and ``n_background`` other genes at matching ranks. The candidates come
        in two rounds: the largest estimates (five eighths of ``n_exact``), then the largest
        estimates corrected by the first round's errors (exact minus estimate), which are
        interpolated over the token position (the estimate misses the shift of the later
        positions, which varies slowly with the position).
{deletion_parameters}    max_cells
        Perturb at most this many start cells (a random subset by ``random_state``).
    emb_layer, pooling
        As in :func:`~scgeneformer.tl.embed` (``layer=``, the old name of ``emb_layer``,
        still works with a warning until version 0.3).
    min_cells
        Genes perturbed in fewer cells get no p-value.
    alternative
        The hypothesis each p-value tests: ``"greater"`` (the default) that perturbing the gene
        moves cells toward the goal state more than perturbing a null gene at the same rank
        does (without states: that it changes the embedding more); ``"less"``, away from the
        goal; ``"two-sided"``, either way.
    n_null_genes
        With a gene list, also perturb this many random genes expressed in the same cells,
        each drawn near a listed gene in mean rank and number of cells
        (:func:`~scgeneformer.tl._background.rank_matched_background`), and test the listed
        genes against them; they are recorded in ``uns[key_added]["null_genes"]``,
        not in ``var``. ``0`` tests the listed genes against each other. Ignored with
        ``genes="all"``, where every other gene is the null.
    key_added
        Prefix of the result slots.
    store_per_cell
        Also write the per-cell shifts as a sparse ``layers[key_added]`` (background genes
        included; :func:`~scgeneformer.tl.perturbation_stats` reads it).
    token_budget, device, dtype
        As in :func:`~scgeneformer.tl.embed` (``batch_tokens=`` is the old name of
        ``token_budget``).
    random_state
        Seed for the ``max_cells`` subset, the two-stage background and the random
        projections of the first-order magnitude.
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    None, or a new AnnData with ``copy=True``. Writes, per gene, ``var[f"{key_added}_shift"]``
    (mean exact shift toward the goal over the cells where it was deleted exactly; NaN
    where it never was, so all NaN with ``"first_order"``), ``_pval`` and ``_fdr`` (against
    the other genes' rank-matched shifts, see Notes), ``_zscore`` (the rank-adjusted
    statistic they come from), ``_n_cells`` (the cells those statistics use), and
    ``_shift_{state}`` per alt state; ``_ci_low`` and ``_ci_high`` (a 95% t-interval of the
    mean shift across its cells) and ``_frac_toward`` (the share of them the perturbation
    moved toward the goal; without states, the share it changed at all). With
    ``"first_order"`` and ``"two_stage"`` also ``_estimate`` (mean first-order estimate over
    every cell with the gene), ``_estimate_{state}`` and ``_n_cells_estimate``; with
    ``store_per_cell`` the estimates go to ``layers[f"{key_added}_estimate"]`` beside the
    exact ``layers[key_added]``.
    ``uns[key_added]`` holds the parameters, the test direction, the null and its
    ``null_genes`` (with a gene list), ``method``, ``n_exact``, ``exact_share`` (the
    share of (cell, gene) pairs deleted exactly) and ``statistics_from``. With
    ``gene_shifts=True``: sparse ``varp[f"{key_added}_gene_shift"]`` (deleted x affected
    gene, the mean downstream shift over the cells where both were present and the first
    was deleted exactly) and ``varp[f"{key_added}_gene_shift_n_cells"]`` (those cells).
    With ``anchor_gene``: ``var[f"{key_added}_anchor_combined"]`` (mean score of deleting
    the anchor with the gene), ``_anchor_interaction`` (mean interaction, as above) and
    ``_anchor_n_cells``, over the cells with both; ``uns[key_added]["anchor_shift"]`` is the
    anchor's own mean score over its cells.

    Notes
    -----
    The per-cell score is ``cos(variant, goal) - cos(original, goal)``: positive when the
    perturbation moves the cell toward the goal. Deleting a highly ranked gene moves any cell
    more, so each score is compared with the other genes perturbed at nearby rank positions
    in the same cell; a gene's z-score is the mean of these residuals over its cells, scaled
    by their pooled spread.

    A p-value says how unusual the gene's z-score is among the null genes' (the other genes
    of the screen, or the background with a gene list), in the direction ``alternative``
    names: the null is the null genes' median and spread (MAD), with a Student t tail for
    ``m`` null genes (Efron's empirical null); and it is never smaller than the smallest
    p-value a sign test across the gene's ``n`` cells could give, ``2**-n`` (``2**(1 - n)``
    two-sided): 15 cells cannot give less than 3e-5, whatever the z-score. With fewer than
    three null genes every p-value is 1. FDR is Benjamini-Hochberg over the genes tested. A small
    FDR says that a gene stands out from the other genes of this screen, in this model; it is
    a ranking to follow up, not proof of causation, and not a test that the state difference
    is real (see the docs page "Reading a screen").

    Which numbers the statistics come from depends on ``method``. ``"exact"``: every exact
    deletion. ``"first_order"``: the estimates, ranked and tested the same way (estimates
    of a gene are comparable across cells, but their scale is not the exact shift's).
    ``"two_stage"``: only exact deletions, of the candidates and of the background; the rank
    baseline of every deletion and the residual spread come from the background alone,
    which was chosen at random, not for its estimates. Candidates are still selected for high
    estimates, so a gene's statistic comes from the cells where it looked promising: a
    screen to choose genes for follow-up, as the exact one is.

    The first-order estimate gives token ``j`` a gate ``g_j`` (1: present): ``log g_j`` is
    added to every query's attention logits for key ``j`` in every layer, and ``g_j``
    weights the token in the mean pooling. Closing the gate is the deletion except for the
    shift of later positions; ``-d score / d g_j`` at the cell is its first-order estimate.
    Toward a state, the shift is added: each token's share ``a_q`` of the score change when
    every token moves one place down (integrated gradients over three steps of the path to
    the moved cell), summed over the tokens after ``j`` and weighted by 0.5, the weight
    the exact shifts asked for (``tl/_first_order.py`` has the measurements). Without states
    the magnitude's gradient vanishes; its leading second-order term is estimated from 16
    random projections of the pooled embedding's derivative (the gate alone, no shift term).

    Screen with a model fine-tuned on ``state_key`` (the classifier from
    :func:`~scgeneformer.tl.finetune`): a pretrained-only model need not embed the states
    apart, and on Kang 2018 it ranks the interferon genes last.

    **Cost.** Each variant is one forward pass of the cell's length, so a cell of L genes
    costs L passes of length L. Measured on a 2-core CPU in float32
    (``bench/bench_in_silico.py``): V1-10M at 128 tokens, 239 variants/s. Scaled from that
    rate by operation count: V1-10M at 2,048 tokens about 6 variants/s (a full cell about 6
    minutes); V2-104M at 4,096 tokens about 0.15 variants/s. ``"two_stage"`` costs per cell
    its ``n_exact + n_background`` deletions and the first-order pass (about ten deletions'
    worth): measured beyond the goal state's embedding, 5.0-5.4x faster than ``"exact"`` at
    256 tokens and 34x at 2,048. GPU rates are not measured yet.
    Before a CPU screen estimated at more than five minutes, a warning gives the estimate;
    ``uns[key_added]["estimated_cpu_seconds"]`` records it.
"""


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
def in_silico_delete(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    method: str = "exact",
    n_exact: int | None = None,
    n_background: int | None = None,
    gene_shifts: bool = False,
    anchor_gene: str | None = None,
    combine: bool = False,
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_null_genes: int = 200,
    key_added: str = "in_silico_delete",
    store_per_cell: bool = False,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Delete each gene from start-state cells and rank genes by the shift toward the goal.

    For every start cell and every gene in it (or every listed gene), the variant is the
    cell's token list without that gene (later genes move up one place). Original and variants
    are embedded at ``emb_layer``; the variants of one cell share one length and run as one dense
    batch. With ``combine=True`` the listed genes are deleted together, one variant per cell,
    and the per-cell shifts go to ``obs[f"{key_added}_combined_shift"]``.
    {parameters}

    Examples
    --------
    >>> clf = sgf.tl.finetune(adata, model, label_key="condition")  # doctest: +SKIP
    >>> sgf.tl.in_silico_delete(
    ...     adata, clf, state_key="condition", start_state="stim", goal_state="ctrl"
    ... )  # doctest: +SKIP
    >>> adata.var.sort_values("in_silico_delete_zscore", ascending=False).head()  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata)  # doctest: +SKIP
    """
    return screen(
        adata,
        model,
        mode="delete",
        state_key=state_key,
        start_state=start_state,
        goal_state=goal_state,
        alt_states=alt_states,
        genes=genes,
        combine=combine,
        method=method,
        n_exact=n_exact,
        n_background=n_background,
        gene_shifts=gene_shifts,
        anchor_gene=anchor_gene,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_null_genes=n_null_genes,
        key_added=key_added,
        store_per_cell=store_per_cell,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        random_state=random_state,
        copy=copy,
    )


@renamed_keywords(layer="emb_layer", batch_tokens="token_budget")
def in_silico_overexpress(
    adata: AnnData,
    model: Geneformer | GeneformerClassifier,
    *,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    alt_states: Sequence[str] = (),
    genes: str | Sequence[str] = "all",
    method: str = "exact",
    max_cells: int | None = None,
    emb_layer: int = -1,
    pooling: str = "mean",
    min_cells: int = 3,
    alternative: str = "greater",
    n_null_genes: int = 200,
    key_added: str = "in_silico_overexpress",
    store_per_cell: bool = False,
    token_budget: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Move each gene to the front of start-state cells and rank genes by the shift.

    As Geneformer's overexpression: the gene moves to the top of the cell's ranking (just
    after ``<cls>``); a listed gene the cell lacks is inserted there, and a cell already at
    the maximum length drops its last gene to make room.
    {parameters}

    Examples
    --------
    >>> sgf.tl.in_silico_overexpress(
    ...     adata, clf, state_key="state", start_state="disease", goal_state="healthy"
    ... )  # doctest: +SKIP
    >>> sgf.pl.deletion_ranking(adata, "in_silico_overexpress")  # doctest: +SKIP
    """
    return screen(
        adata,
        model,
        mode="overexpress",
        state_key=state_key,
        start_state=start_state,
        goal_state=goal_state,
        alt_states=alt_states,
        genes=genes,
        combine=False,
        method=method,
        n_exact=None,
        n_background=None,
        gene_shifts=False,
        anchor_gene=None,
        max_cells=max_cells,
        emb_layer=emb_layer,
        pooling=pooling,
        min_cells=min_cells,
        alternative=alternative,
        n_null_genes=n_null_genes,
        key_added=key_added,
        store_per_cell=store_per_cell,
        token_budget=token_budget,
        device=device,
        dtype=dtype,
        random_state=random_state,
        copy=copy,
    )


in_silico_delete.__doc__ = in_silico_delete.__doc__.replace(
    "{parameters}", _SHARED_PARAMETERS.replace("{deletion_parameters}", _DELETION_PARAMETERS)
)
in_silico_overexpress.__doc__ = in_silico_overexpress.__doc__.replace(
    "{parameters}", _SHARED_PARAMETERS.replace("{deletion_parameters}", "")
)
