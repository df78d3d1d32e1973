"""First-order and two-stage deletion screens: the gate's derivative, equivalence, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import scgeneformer as sgf
from scgeneformer.tl._first_order import (
    POSITION_WEIGHT,
    REFINE_SHARE,
    _gated_pool,
    choose_candidates,
    gate_estimates,
    rank_matched_positions,
)
from scgeneformer.tl._perturb_stats import rank_residuals

from .test_in_silico import states_data  # noqa: F401  (the shared fixture)

KWARGS = dict(state_key="state", start_state="disease", goal_state="healthy")


@pytest.fixture(scope="module")
def screen_data(states_data):  # noqa: F811  (the fixture imported above)
    return states_data


def _one_cell(adata, model):
    row = adata.obsm["geneformer_tokens"][0, : adata.obs["geneformer_n_tokens"].iloc[0]]
    return torch.as_tensor(row.astype(np.int64))[:30]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_goal_estimates_equal_finite_differences_of_the_gate(screen_data, pooling):
    adata, model = screen_data
    model = copy.deepcopy(model).double().eval()
    row = _one_cell(adata, model)
    goal = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)).double()
    where = dict(layer_index=2, lead=1, trail=1, pooling=pooling)
    # Batched with a shorter cell: padding must not leak into the longer cell's estimates.
    both = gate_estimates(model, [row, row[:12]], {"goal": goal}, position_steps=0, **where)
    estimate = both[0]["goal"]
    alone = gate_estimates(model, [row[:12]], {"goal": goal}, position_steps=0, **where)
    alone = alone[0]["goal"]
    np.testing.assert_allclose(both[1]["goal"], alone, rtol=1e-9, atol=1e-15)
    length = torch.tensor([len(row)])

    def score(log_gate):
        with torch.no_grad():
            pooled = _gated_pool(model, row[None, :], length, log_gate[None, :], **where)
        return torch.nn.functional.cosine_similarity(pooled, goal[None, :]).item()

    h = 1e-5
    for j in (1, 7, 28):
        up, down = (
            torch.zeros(len(row), dtype=torch.float64),
            torch.zeros(len(row), dtype=torch.float64),
        )
        up[j], down[j] = h, -h
        difference = -(score(up) - score(down)) / (2 * h)
        assert estimate[j].item() == pytest.approx(difference, rel=1e-5, abs=1e-12)
    assert estimate[1:-1].abs().max() > 1e-6  # the gates do reach the score


def test_position_term_adds_up_to_moving_every_later_token(screen_data):
    adata, model = screen_data
    model = copy.deepcopy(model).double().eval()
    row = _one_cell(adata, model)
    goal = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)).double()
    where = dict(layer_index=2, lead=1, trail=1, pooling="mean")

    def estimates(rows, steps):
        found = gate_estimates(model, rows, {"goal": goal}, position_steps=steps, **where)
        return [f["goal"] for f in found]

    gate_only = estimates([row], 0)[0]
    # Path-integral shares add up to the whole move (up to the midpoint rule's error):
    # at token 0 the position term covers every token after it, moved one place down.
    term = (estimates([row], 64)[0] - gate_only) / POSITION_WEIGHT
    weight = model.bert.embeddings.position_embeddings.weight.detach()[: len(row)]
    move = torch.zeros_like(weight)
    move[1:] = weight[:-1] - weight[1:]

    def score(offset):
        with torch.no_grad():
            states = model.hidden_states(row[None], layer=2, position_offset=offset)
        pooled = states[:, 1:-1].mean(1)  # the genes, between <cls> and <eos>
        return torch.nn.functional.cosine_similarity(pooled, goal[None, :]).item()

    whole = score(move[None]) - score(torch.zeros_like(move)[None])
    assert abs(whole) > 1e-4  # moving the positions does reach the score
    assert term[0].item() == pytest.approx(whole, rel=2e-3)
    # Later tokens' terms cover fewer moved tokens; the last token moves nothing.
    assert term[-1].item() == 0.0
    with pytest.raises(ValueError, match=r"position_offset has shape \(30, 32\)"):
        model.hidden_states(row[None], position_offset=move)
    # Padding of a shorter cell in the same pass leaves both cells' estimates as alone.
    both = estimates([row, row[:12]], 3)
    np.testing.assert_allclose(both[0], estimates([row], 3)[0], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(both[1], estimates([row[:12]], 3)[0], rtol=1e-9, atol=1e-15)


def test_magnitude_estimate_equals_the_second_order_term_of_the_gate(screen_data):
    adata, model = screen_data
    model = copy.deepcopy(model).double().eval()
    row = _one_cell(adata, model)
    where = dict(layer_index=2, lead=1, trail=1, pooling="mean")
    # As many directions as the hidden size: the orthonormal basis, no sampling noise.
    estimate = gate_estimates(model, [row], {}, n_projections=model.hidden_size, **where)
    estimate = estimate[0]["magnitude"]
    length = torch.tensor([len(row)])
    with torch.no_grad():
        zero = torch.zeros(1, len(row)).double()
        original = _gated_pool(model, row[None, :], length, zero, **where)
        eps = 1e-4
        for j in (2, 15):
            gate = torch.zeros(1, len(row), dtype=torch.float64)
            gate[0, j] = np.log1p(-eps)  # g_j = 1 - eps
            moved = _gated_pool(model, row[None, :], length, gate, **where)
            change = 1 - torch.nn.functional.cosine_similarity(moved, original).item()
            assert estimate[j].item() * eps**2 == pytest.approx(change, rel=1e-3)
    # Random directions estimate the same norm without bias (noise about sqrt(2/k)).
    sampled = gate_estimates(model, [row], {}, n_projections=4000, seeds=[1], **where)
    sampled = sampled[0]["magnitude"]
    np.testing.assert_allclose(sampled[1:-1], estimate[1:-1], rtol=0.15)


def test_two_stage_with_every_gene_exact_equals_exact(screen_data):
    adata, model = screen_data
    exact, two = adata.copy(), adata.copy()
    common = dict(max_cells=5, min_cells=1, store_per_cell=True, **KWARGS)
    sgf.tl.in_silico_delete(exact, model, **common)
    sgf.tl.in_silico_delete(two, model, method="two_stage", n_exact=256, **common)
    for column in ("shift", "zscore", "pval", "fdr", "n_cells"):
        np.testing.assert_array_equal(
            exact.var[f"in_silico_delete_{column}"], two.var[f"in_silico_delete_{column}"]
        )
    assert (exact.layers["in_silico_delete"] != two.layers["in_silico_delete"]).nnz == 0
    assert two.uns["in_silico_delete"]["exact_share"] == 1.0
    assert two.uns["in_silico_delete"]["n_exact"] == 256
    assert two.var["in_silico_delete_estimate"].notna().sum() > 50


def test_two_stage_runs_each_unperturbed_cell_once(screen_data, monkeypatch):
    # The candidates' probe and the exact stage share the original cell's states.
    adata, model = screen_data
    model = copy.deepcopy(model)
    originals = []
    real = model.hidden_states

    def counting(input_ids, *args, **kwargs):
        if kwargs.get("key_gate") is None and input_ids.shape[0] == 1:
            originals.append(input_ids.shape[1])
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counting)
    sgf.tl.in_silico_delete(
        adata.copy(), model, method="two_stage", n_exact=5, max_cells=4, min_cells=1, **KWARGS
    )
    lengths = adata.obs["geneformer_n_tokens"].to_numpy()
    assert len(originals) == 4 and set(originals) <= set(lengths.tolist())


def test_two_stage_deletes_candidates_and_a_background(screen_data):
    adata, model = screen_data
    adata = adata.copy()
    sgf.tl.in_silico_delete(
        adata,
        model,
        method="two_stage",
        n_exact=5,
        n_background=3,
        max_cells=4,
        min_cells=1,
        store_per_cell=True,
        **KWARGS,
    )
    sgf.tl.in_silico_delete(
        adata, model, max_cells=4, min_cells=1, store_per_cell=True, key_added="all", **KWARGS
    )
    exact = adata.layers["in_silico_delete"].tocsr()
    every = adata.layers["all"].tocsr()
    estimate = adata.layers["in_silico_delete_estimate"].tocsr()
    uns = adata.uns["in_silico_delete"]
    assert uns["method"] == "two_stage" and "background" in uns["statistics_from"]
    # The first round: the leading estimates; the second round's two are chosen after it.
    n_first = 5 - round(REFINE_SHARE * 5)
    for c in np.unique(estimate.nonzero()[0]):
        deleted = exact[c].indices
        assert len(deleted) == 8
        top = estimate[c].indices[np.argsort(-estimate[c].data)[:n_first]]
        assert set(top) <= set(deleted)
        # Probed in the first round or deleted after it, each shift is the exact screen's.
        np.testing.assert_allclose(
            exact[c, deleted].toarray(), every[c, deleted].toarray(), rtol=1e-4, atol=1e-6
        )
    assert uns["exact_share"] == pytest.approx(uns["n_perturbations"] / uns["n_estimates"])


def test_choose_candidates_corrects_the_estimate_by_its_error_over_positions():
    # Exact shifts = estimate + a slowly varying term of the position (the shift of the later
    # tokens, which the gate misses): one round by the estimate misses the genes the term
    # lifts, the second round finds them from the first round's measured errors.
    rng = np.random.default_rng(0)
    where = torch.arange(1, 201)
    estimate = torch.as_tensor(rng.normal(size=200))
    exact = estimate.numpy() + np.where(where.numpy() > 150, 3.0, 0.0)
    top = set(np.argsort(-exact)[:10].tolist())
    asked = []

    def probe(index):
        asked.append(np.asarray(index))
        return exact[index]

    one = choose_candidates(estimate, where, 32)
    two = choose_candidates(estimate, where, 32, probe)
    assert len(two) == 32 and len(set(two.tolist())) == 32
    assert len(asked) == 1 and len(asked[0]) == 32 - round(REFINE_SHARE * 32)
    assert set(asked[0].tolist()) <= set(two.tolist())
    assert len(top & set(two.tolist())) >= len(top & set(one.tolist())) + 3
    # A cell with no more genes than n: all of them, and nothing probed.
    assert choose_candidates(estimate[:5], where[:5], 8, probe).tolist() == [0, 1, 2, 3, 4]
    assert len(asked) == 1


def test_first_order_writes_estimates_and_no_exact_shift(screen_data):
    adata, model = screen_data
    adata = adata.copy()
    sgf.tl.in_silico_delete(adata, model, method="first_order", max_cells=3, min_cells=1)
    var = adata.var
    assert var["in_silico_delete_shift"].isna().all()
    assert var["in_silico_delete_estimate"].notna().sum() > 50
    # Without states the estimate is of the magnitude: never negative.
    assert (var["in_silico_delete_estimate"].dropna() >= 0).all()
    assert adata.uns["in_silico_delete"]["statistics_from"].startswith("first-order")
    assert adata.uns["in_silico_delete"]["exact_share"] == 0.0


def test_rank_matched_positions_avoids_candidates_and_follows_their_ranks():
    rng = np.random.default_rng(0)
    positions = np.arange(1, 200)
    chosen = np.array([1, 2, 3, 100, 101])
    picked = rank_matched_positions(positions, chosen, 5, rng)
    assert len(set(picked)) == 5 and not set(picked) & set(chosen)
    # Each background gene sits next to a candidate's rank: the nearest free positions.
    assert np.abs(picked[:, None] - chosen[None, :]).min(axis=1).max() <= 3
    assert len(rank_matched_positions(positions[:7], chosen[:3], 10, rng)) == 4


def test_baseline_only_residuals_ignore_the_other_deletions():
    cell = np.zeros(12, dtype=int)
    position = np.arange(12)
    score = 1.0 - 0.05 * position
    baseline = position % 3 == 0
    score[~baseline] += 0.5  # chosen for being high: they must not move the baseline
    residual = rank_residuals(cell, position, score, window=3, baseline=baseline)
    np.testing.assert_allclose(residual[baseline], 0.0, atol=1e-12)
    np.testing.assert_allclose(residual[~baseline], 0.5, atol=1e-12)
    np.testing.assert_array_equal(
        rank_residuals(cell, position, score, window=3, baseline=np.ones(12, bool)),
        rank_residuals(cell, position, score, window=3),
    )


def test_bad_method_input_is_refused(screen_data):
    adata, model = screen_data
    adata = adata.copy()
    before = set(adata.var.columns), set(adata.uns), set(adata.layers)
    with pytest.raises(ValueError, match=r"method must be one of .*'fast'"):
        sgf.tl.in_silico_delete(adata, model, method="fast", **KWARGS)
    with pytest.raises(ValueError, match="n_exact must be at least 1, got 0"):
        sgf.tl.in_silico_delete(adata, model, method="two_stage", n_exact=0, **KWARGS)
    with pytest.raises(TypeError, match="n_exact must be an integer"):
        sgf.tl.in_silico_delete(adata, model, method="two_stage", n_exact=2.5, **KWARGS)
    with pytest.raises(ValueError, match="n_exact applies to method='two_stage'"):
        sgf.tl.in_silico_delete(adata, model, n_exact=10, **KWARGS)
    with pytest.raises(ValueError, match=r"deletion only.*method='exact'"):
        sgf.tl.in_silico_overexpress(adata, model, method="first_order", **KWARGS)
    with pytest.raises(ValueError, match=r"combine=True.*method='exact'"):
        sgf.tl.in_silico_delete(
            adata, model, genes=[adata.var_names[0]], combine=True, method="two_stage", **KWARGS
        )
    assert (set(adata.var.columns), set(adata.uns), set(adata.layers)) == before


def _states(model, row, layer_index):
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(row).astype(np.int64))[None, :]
        return model.eval().hidden_states(ids, layer=layer_index)[0].numpy()


@pytest.mark.parametrize("method", ["exact", "two_stage"])
def test_downstream_gene_shift_equals_a_hand_computation(screen_data, method, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    adata, model = screen_data
    adata = adata.copy()
    sgf.tl.in_silico_delete(
        adata,
        model,
        method=method,
        n_exact=4 if method == "two_stage" else None,
        gene_shifts=True,
        max_cells=3,
        min_cells=1,
        store_per_cell=True,
        **KWARGS,
    )
    shift = adata.varp["in_silico_delete_gene_shift"].tocsr()
    n_cells = adata.varp["in_silico_delete_gene_shift_n_cells"].tocsr()
    deleted_exactly = adata.layers["in_silico_delete"].tocsr()
    tokens, n = adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"].to_numpy()
    cells = np.unique(deleted_exactly.nonzero()[0])
    column = {int(t): j for j, t in enumerate(adata.var["geneformer_token"])}
    # One deleted gene of the first cell, and the affected genes after and before it.
    c = cells[0]
    row = tokens[c, : n[c]]
    # A deleted gene with genes on both sides of it (not next to <cls>/<eos>).
    var_token = adata.var["geneformer_token"].to_numpy()
    d, p = next(
        (d, int(np.flatnonzero(row == var_token[d])[0]))
        for d in deleted_exactly[c].indices
        if 2 <= np.flatnonzero(row == var_token[d])[0] <= len(row) - 4
    )
    original = _states(model, row, model.num_layers - 1)
    variant = _states(model, np.delete(row, p), model.num_layers - 1)
    for q in (p - 1, p + 2):
        a = column[int(row[q])]
        # The affected gene's cells: those where both were present and d was deleted.
        with_both = [
            cc
            for cc in cells
            if deleted_exactly[cc, d] != 0 and np.isin(row[q], tokens[cc, : n[cc]])
        ]
        assert n_cells[d, a] == len(with_both)
        expected = []
        for cc in with_both:
            r = tokens[cc, : n[cc]]
            pd_, pa = np.flatnonzero(r == row[p])[0], np.flatnonzero(r == row[q])[0]
            o = _states(model, r, model.num_layers - 1)[pa]
            v = _states(model, np.delete(r, pd_), model.num_layers - 1)[pa - (pa > pd_)]
            expected.append(1 - o @ v / np.linalg.norm(o) / np.linalg.norm(v))
        assert shift[d, a] == pytest.approx(np.mean(expected), abs=2e-6)
    own = 1 - original[p + 2] @ variant[p + 1] / np.linalg.norm(original[p + 2]) / np.linalg.norm(
        variant[p + 1]
    )
    assert own > 0  # the single-cell value above is a real change, not a zero
    assert n_cells[d, d] == 0  # the deleted gene itself is not "affected"
    ax = sgf.pl.downstream_genes(adata, adata.var_names[d], n_top=5, show=False)
    assert len(ax.patches) == min(5, n_cells[d].nnz)


def test_gene_shifts_are_refused_with_first_order(screen_data):
    adata, model = screen_data
    before = set(adata.varp), set(adata.var.columns)
    with pytest.raises(ValueError, match=r"gene_shifts=True .*method='first_order'"):
        sgf.tl.in_silico_delete(adata, model, method="first_order", gene_shifts=True, **KWARGS)
    assert (set(adata.varp), set(adata.var.columns)) == before
    with pytest.raises(KeyError, match="gene_shifts=True"):
        sgf.pl.downstream_genes(adata, adata.var_names[0], show=False)


def _goal_score(model, row, goal, layer_index):
    states = _states(model, row, layer_index)
    pooled = states[1 : len(row) - 1].mean(axis=0)
    return pooled @ goal / np.linalg.norm(pooled) / np.linalg.norm(goal)


def test_anchor_interaction_equals_its_definition_on_hand_made_variants(screen_data):
    adata, model = screen_data
    adata = adata.copy()
    tokens = adata.obsm["geneformer_tokens"]
    disease = np.flatnonzero(adata.obs["state"] == "disease")[:3]
    sub = adata[np.r_[disease, np.flatnonzero(adata.obs["state"] == "healthy")]].copy()
    anchor_token = tokens[disease[0], 3]
    anchor = sub.var_names[sub.var["geneformer_token"] == anchor_token][0]
    sgf.tl.in_silico_delete(sub, model, anchor_gene=anchor, min_cells=1, **KWARGS)
    layer_index = model.num_layers - 1
    goal_rows = np.flatnonzero(sub.obs["state"] == "healthy")
    t, m = sub.obsm["geneformer_tokens"], sub.obs["geneformer_n_tokens"].to_numpy()
    goal = np.mean(
        [_states(model, t[r, : m[r]], layer_index)[1 : m[r] - 1].mean(0) for r in goal_rows], 0
    )
    gene_token = tokens[disease[0], 7]
    gene = sub.var_names[sub.var["geneformer_token"] == gene_token][0]
    combined, interaction = [], []
    for c in range(3):
        row = t[c, : m[c]]
        if not (np.isin(anchor_token, row) and np.isin(gene_token, row)):
            continue
        base = _goal_score(model, row, goal, layer_index)
        both, alone, single = (
            _goal_score(model, row[~np.isin(row, ids)], goal, layer_index) - base
            for ids in ([anchor_token, gene_token], [anchor_token], [gene_token])
        )
        combined.append(both)
        interaction.append(both - (alone + single))
    var = sub.var.loc[gene]
    assert var["in_silico_delete_anchor_n_cells"] == len(combined) >= 1
    assert var["in_silico_delete_anchor_combined"] == pytest.approx(np.mean(combined), abs=2e-6)
    assert var["in_silico_delete_anchor_interaction"] == pytest.approx(
        np.mean(interaction), abs=3e-6
    )
    assert np.isnan(sub.var.loc[anchor, "in_silico_delete_anchor_combined"])
    assert sub.uns["in_silico_delete"]["anchor_gene"] == anchor


def test_bad_anchor_is_refused(screen_data):
    adata, model = screen_data
    adata = adata.copy()
    before = set(adata.var.columns), set(adata.uns)
    with pytest.raises(ValueError, match=r"anchor_gene='NOPE' is not in the vocabulary"):
        sgf.tl.in_silico_delete(adata, model, anchor_gene="NOPE", **KWARGS)
    disease = np.flatnonzero(adata.obs["state"] == "disease")
    two = adata[np.r_[disease[:2], np.flatnonzero(adata.obs["state"] == "healthy")]].copy()
    tokens = two.obsm["geneformer_tokens"][:2]
    absent = two.var_names[~two.var["geneformer_token"].isin(tokens.ravel())]
    in_vocab = [g for g in absent if model.vocab.tokens_for([g])[0] >= 0]
    assert in_vocab  # a vocabulary gene neither start cell has
    with pytest.raises(ValueError, match=r"is in none of the 2 start cells"):
        sgf.tl.in_silico_delete(two, model, anchor_gene=in_vocab[0], **KWARGS)
    with pytest.raises(ValueError, match=r"anchor_gene .*method='first_order'"):
        sgf.tl.in_silico_delete(
            adata, model, anchor_gene=adata.var_names[0], method="first_order", **KWARGS
        )
    assert (set(adata.var.columns), set(adata.uns)) == before


@pytest.fixture(scope="module")
def trained_screens():
    """A small classifier fine-tuned on synthetic states; the three screens on 12 cells."""
    adata = sgf.datasets.synthetic_states(n_cells=300, n_genes=200, random_state=0)
    vocab = sgf.Vocabulary.build(adata, max_length=96, min_cells=5)
    model = sgf.Geneformer.from_config(
        "V1-10M",
        vocab,
        random_state=0,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=96,
    )
    clf = sgf.tl.finetune(
        adata,
        model,
        label_key="state",
        epochs=3,
        lr=3e-3,
        token_budget=960,  # about 10 cells a step: enough steps to learn the states
        baseline=False,
        early_stopping_patience=None,
        random_state=0,
    )
    common = dict(max_cells=12, emb_layer=0, min_cells=1, store_per_cell=True, **KWARGS)
    for method in ("exact", "first_order", "two_stage"):
        extra = {"n_exact": 16} if method == "two_stage" else {}
        sgf.tl.in_silico_delete(
            adata, clf.encoder, method=method, key_added=method, **common, **extra
        )
    return adata


def _per_cell_recall(adata, chosen_from) -> list[float]:
    exact = adata.layers["exact"].tocsr()
    recall = []
    for c in np.unique(exact.nonzero()[0]):
        truth = exact[c].toarray().ravel()
        expressed = np.flatnonzero(truth != 0)
        top = set(expressed[np.argsort(-truth[expressed])[:10]].tolist())
        recall.append(len(top & set(chosen_from(c, expressed))) / len(top))
    return recall


def test_first_order_and_two_stage_agree_with_exact_on_a_trained_classifier(trained_screens):
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    adata = trained_screens
    assert adata.uns["state_finetune"]["accuracy"] >= 0.9  # a classifier that has learned
    exact = adata.layers["exact"].tocsr()
    estimate = adata.layers["first_order_estimate"].tocsr()
    two = adata.layers["two_stage"].tocsr()
    rho = [
        spearmanr(exact[c].toarray().ravel()[e], estimate[c].toarray().ravel()[e]).statistic
        for c in np.unique(exact.nonzero()[0])
        for e in [np.flatnonzero(exact[c].toarray().ravel() != 0)]
    ]

    def first_order_top(c, expressed):
        values = estimate[c].toarray().ravel()[expressed]
        return expressed[np.argsort(-values)[:16]].tolist()

    def two_stage_deleted(c, expressed):
        return two[c].indices.tolist()

    recall_first = np.mean(_per_cell_recall(adata, first_order_top))
    recall_two = np.mean(_per_cell_recall(adata, two_stage_deleted))
    var = adata.var
    roles = var["gene_role"].isin(["driver", "neutral"])
    drivers = var.loc[roles, "gene_role"] == "driver"
    # Genes a two-stage screen never deleted exactly have no z-score: ranked last.
    auroc = {
        m: roc_auc_score(drivers, var.loc[roles, f"{m}_zscore"].fillna(-1e9))
        for m in ("exact", "first_order", "two_stage")
    }
    # Floors a little under what this test measured (2026-12-03, with the position term):
    # Spearman 0.96 (0.86 with the gate term alone); recall of the exact top 10 within the
    # first-order top 16 0.98 (0.91), within the two-stage deletions (16 candidates in two
    # rounds + 4 background, of about 75 genes) 1.00 (0.97); AUROC 1.00, 1.00, 0.98.
    assert np.median(rho) >= 0.9
    assert recall_first >= 0.93
    assert recall_two >= 0.95 and recall_two >= recall_first
    assert min(auroc.values()) >= 0.95
    assert adata.uns["two_stage"]["exact_share"] < 0.3
