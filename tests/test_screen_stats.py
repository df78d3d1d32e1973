"""Screen statistics: direction, p-value floor, background genes, effect sizes, Geneformer."""

from __future__ import annotations

import numpy as np
import pytest

import scgeneformer as sgf
from scgeneformer.tl._background import rank_matched_background, token_profile
from scgeneformer.tl._perturb_stats import gene_statistics, min_pvalue

TINY = dict(
    num_hidden_layers=2,
    hidden_size=32,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def states_data():
    adata = sgf.datasets.synthetic_states(n_cells=120, n_genes=150, random_state=3)
    vocab = sgf.Vocabulary.build(adata, max_length=256)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    sgf.pp.rank_tokenize(adata, vocab)
    return adata, model


def test_a_short_list_is_tested_against_background_genes(states_data):
    adata, model = states_data
    adata = adata.copy()
    drivers = list(adata.var_names[adata.var["gene_role"] == "driver"][:3])
    kwargs = dict(state_key="state", start_state="disease", goal_state="healthy", max_cells=20)
    sgf.tl.in_silico_delete(adata, model, genes=drivers, n_null_genes=40, **kwargs)
    params = adata.uns["in_silico_delete"]
    assert params["alternative"] == "greater" and "background" in params["null"]
    background = params["null_genes"]
    assert len(background) == 40 and not set(background) & set(drivers)
    assert params["n_null_genes"] >= 30  # background genes in at least min_cells cells
    tested = adata.var["in_silico_delete_pval"].dropna()
    assert sorted(tested.index) == sorted(drivers)  # the background is not reported in var
    assert (tested < 1).all()
    for column in ("ci_low", "ci_high", "frac_toward"):
        assert adata.var[f"in_silico_delete_{column}"][drivers].notna().all()
    low, high = adata.var["in_silico_delete_ci_low"], adata.var["in_silico_delete_ci_high"]
    assert (low[drivers] <= adata.var["in_silico_delete_shift"][drivers]).all()
    assert (adata.var["in_silico_delete_shift"][drivers] <= high[drivers]).all()
    with pytest.raises(ValueError, match="alternative must be one of"):
        sgf.tl.in_silico_delete(adata, model, genes=drivers, alternative="up", **kwargs)


def test_geneformer_statistics_match_scipy_on_the_per_cell_shifts(states_data):
    from scipy import stats

    adata, model = states_data
    adata = adata.copy()
    kwargs = dict(state_key="state", goal_state="healthy", max_cells=8, store_per_cell=True)
    sgf.tl.in_silico_delete(adata, model, start_state="disease", **kwargs)
    table = sgf.tl.perturbation_stats(adata)
    per_cell = adata.layers["in_silico_delete"].tocsc()
    pool = per_cell.data
    gene = table.index[3]
    mine = per_cell[:, adata.var_names.get_loc(gene)].data
    assert table.loc[gene, "N_Detections"] == len(mine)
    assert table.loc[gene, "Shift_to_goal_end"] == pytest.approx(mine.mean())
    expected = stats.ranksums(pool, mine).pvalue
    assert table.loc[gene, "Goal_end_vs_random_pval"] == pytest.approx(expected, rel=1e-9)
    sig = table["Sig"].to_numpy()
    assert (np.diff(sig) <= 0).all() and set(sig) <= {0, 1}  # significant genes first
    # vs_null: the same deletions in healthy cells are the null.
    sgf.tl.in_silico_delete(adata, model, start_state="healthy", key_added="ctrl", **kwargs)
    versus = sgf.tl.perturbation_stats(adata, mode="vs_null", null_key="ctrl")
    null = adata.layers["ctrl"].tocsc()[:, adata.var_names.get_loc(gene)].data
    row = versus.loc[gene]
    assert row["Test_vs_null_avg_shift"] == pytest.approx(mine.mean() - null.mean())
    assert row["Test_vs_null_pval"] == pytest.approx(stats.ranksums(mine, null).pvalue)
    assert (row["N_Detections_test"], row["N_Detections_null"]) == (len(mine), len(null))
    with pytest.raises(KeyError, match="store_per_cell=True"):
        sgf.tl.perturbation_stats(adata, "nothing")
    with pytest.raises(ValueError, match="needs null_key"):
        sgf.tl.perturbation_stats(adata, mode="vs_null")


def simulated_screen(seed: int, n_cells: int = 60, n_genes: int = 200):
    """Per-(cell, gene) scores with a rank trend, per-gene model quirks and cell noise."""
    rng = np.random.default_rng(seed)
    cell = np.repeat(np.arange(n_cells), n_genes)
    token = np.tile(np.arange(n_genes), n_cells)
    position = np.concatenate([rng.permutation(n_genes) for _ in range(n_cells)])
    base = 0.05 / (1 + position)
    gene_effect = rng.normal(0, 2e-4, n_genes)[token]  # systematic per-gene quirks of a model
    noise = rng.normal(0, 1e-3, len(cell))
    return cell, token, position, base + gene_effect + noise


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_statistics_are_calibrated_and_uniform_without_a_hit(alternative):
    from scipy import stats

    for seed in range(3):
        cell, token, position, score = simulated_screen(seed)
        null = gene_statistics(cell, token, position, score, min_cells=3, alternative=alternative)
        assert (null.fdr < 0.05).mean() <= 0.05
        # Uniform p-values: the largest CDF gap within 0.1 (the 5% KS bound for 200 is 0.096).
        assert stats.kstest(null.pval, "uniform").statistic < 0.1


def test_statistics_find_a_planted_gene_in_the_direction_tested():
    cell, token, position, score = simulated_screen(1)
    null = gene_statistics(cell, token, position, score, min_cells=3)
    toward = score + np.where(token == 7, 3e-3, 0.0) - np.where(token == 9, 3e-3, 0.0)
    result = {
        alt: gene_statistics(cell, token, position, toward, min_cells=3, alternative=alt)
        for alt in ("greater", "less", "two-sided")
    }
    assert result["greater"].fdr[7] < 0.05 and result["greater"].pval[9] > 0.5
    assert result["less"].fdr[9] < 0.05 and result["less"].pval[7] > 0.5
    assert result["two-sided"].fdr[[7, 9]].max() < 0.05
    assert np.argmax(result["greater"].shift - null.shift) == 7
    assert np.allclose(result["greater"].zscore, result["less"].zscore)  # z ranks as before


@pytest.mark.parametrize(("n_cells", "alternative"), [(5, "greater"), (8, "two-sided")])
def test_the_smallest_p_value_is_the_one_the_docstring_gives(n_cells, alternative):
    """A gene far beyond 199 null genes, seen in n cells, gets 2**-n (2**(1-n) two-sided)."""
    cell, token, position, score = simulated_screen(2, n_cells=40)
    seen = (token != 7) | (cell < n_cells)
    cell, token, position = cell[seen], token[seen], position[seen]
    score = score[seen] + np.where(token == 7, 1.0, 0.0)  # far beyond any null gene
    result = gene_statistics(cell, token, position, score, min_cells=3, alternative=alternative)
    expected = 2.0**-n_cells * (2 if alternative == "two-sided" else 1)
    assert result.n_cells[7] == n_cells and result.n_null[7] == 199
    assert result.pval[7] == expected == min_pvalue(n_cells, alternative)
    # The floor binds: the same effect over all 40 cells gives far less.
    everywhere = score + np.where(token == 8, 1.0, 0.0)
    result = gene_statistics(
        cell, token, position, everywhere, min_cells=3, alternative=alternative
    )
    assert result.pval[8] < expected / 1000


def test_effect_sizes_by_hand():
    cell, token, position, score = simulated_screen(3, n_cells=12, n_genes=30)
    result = gene_statistics(cell, token, position, score, min_cells=3)
    mine = score[token == 4]
    half = 2.200985 * mine.std(ddof=1) / np.sqrt(12)  # t(0.975, 11 degrees of freedom)
    assert result.ci_low[4] == pytest.approx(mine.mean() - half, rel=1e-6)
    assert result.ci_high[4] == pytest.approx(mine.mean() + half, rel=1e-6)
    assert result.frac_toward[4] == pytest.approx((mine > 0).mean())


def test_background_genes_test_a_short_list():
    cell, token, position, score = simulated_screen(4)
    score = score + np.where(token == 7, 3e-3, 0.0)
    listed = np.array([7, 8])
    kept = np.isin(token, np.r_[listed, np.arange(100, 160)])
    args = (cell[kept], token[kept], position[kept], score[kept])
    short = gene_statistics(*args, min_cells=3, null_tokens=np.arange(100, 160))
    assert short.n_null[np.isin(short.token, listed)].tolist() == [60, 60]
    assert short.fdr[short.token == 7][0] < 0.05 and short.fdr[short.token == 8][0] > 0.05
    assert np.isnan(short.fdr[~np.isin(short.token, listed)]).all()  # the null is not reported
    # Without a background three listed genes have two null genes each: too few to test.
    three = np.isin(token, [7, 8, 9])
    alone = gene_statistics(cell[three], token[three], position[three], score[three], min_cells=3)
    assert alone.n_null.tolist() == [2, 2, 2] and (alone.pval == 1).all()


def test_background_is_rank_matched_random_and_leaves_out_the_listed_genes():
    rng = np.random.default_rng(0)
    n_cells, n_genes = 50, 400
    # Gene g sits near rank g in every cell.
    order = np.argsort(np.arange(n_genes)[None, :] + rng.normal(0, 20, (n_cells, n_genes)), 1)
    tokens = np.c_[np.full(n_cells, 2), order + 4, np.full(n_cells, 3)]
    n_tokens = np.full(n_cells, n_genes + 2)
    special = np.array([0, 1, 2, 3])
    listed = np.array([10, 14, 300])
    background = rank_matched_background(
        tokens, n_tokens, np.arange(n_cells), listed, 30, special=special, random_state=1
    )
    assert len(background) == 30 and not np.isin(listed, background).any()
    assert not np.isin(special, background).any()
    genes, _, rank = token_profile(tokens, n_tokens, np.arange(n_cells), special)
    mean_rank = dict(zip(genes, rank, strict=True))
    nearest = [min(abs(mean_rank[b] - mean_rank[g]) for g in listed) for b in background]
    # Each background gene sits near a listed one in rank (a uniform draw: 0.1 on average).
    assert max(nearest) < 0.1 and np.mean(nearest) < 0.03
    other = rank_matched_background(
        tokens, n_tokens, np.arange(n_cells), listed, 30, special=special, random_state=2
    )
    assert not np.array_equal(background, other)  # random, by the seed
    everything = rank_matched_background(
        tokens, n_tokens, np.arange(n_cells), listed, 1000, special=special
    )
    assert len(everything) == n_genes - len(listed)
