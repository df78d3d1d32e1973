from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse, stats

from scgeneformer.datasets._synthetic import synthetic_states


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return synthetic_states()


def _log_cp10k(adata: ad.AnnData) -> np.ndarray:
    counts = adata.X.toarray()
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _disease(adata: ad.AnnData) -> np.ndarray:
    return (adata.obs["state"] == adata.uns["synthetic_states"]["state_names"][1]).to_numpy()


def _state_difference(adata: ad.AnnData) -> np.ndarray:
    """Mean log1p-CP10k expression in the second state minus the first, per gene."""
    logx = _log_cp10k(adata)
    disease = _disease(adata)
    return logx[disease].mean(axis=0) - logx[~disease].mean(axis=0)


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    u = stats.mannwhitneyu(positive, negative).statistic
    return float(u / (positive.size * negative.size))


def _positions(adata: ad.AnnData, role: str) -> np.ndarray:
    return np.flatnonzero(adata.var["gene_role"] == role)


def test_shape_and_matrix(adata):
    assert adata.shape == (2000, 600)
    assert isinstance(adata.X, sparse.csr_matrix)
    assert adata.X.dtype == np.float32
    assert adata.obs_names.is_unique and adata.var_names.is_unique


def test_counts_are_nonnegative_integers(adata):
    values = adata.X.data
    assert values.min() >= 0
    np.testing.assert_array_equal(values, np.round(values))
    np.testing.assert_allclose(adata.obs["n_counts"], np.asarray(adata.X.sum(axis=1)).ravel())


def test_obs_annotations(adata):
    obs = adata.obs
    assert list(obs.columns) == ["state", "cell_type", "donor", "n_counts"]
    assert list(obs["state"].cat.categories) == ["healthy", "disease"]
    assert obs["state"].value_counts().to_dict() == {"healthy": 1000, "disease": 1000}
    assert list(obs["cell_type"].cat.categories) == ["type_1", "type_2"]
    assert obs["cell_type"].value_counts().min() > 800
    per_donor = pd.crosstab(obs["donor"], obs["state"])
    assert per_donor.shape == (4, 2)
    assert (per_donor == 250).all().all()


def test_var_annotations(adata):
    var = adata.var
    assert all(re.fullmatch(r"ENSGSYN\d{11}", name) for name in adata.var_names)
    assert list(var["gene_role"].cat.categories) == ["driver", "target", "housekeeping", "neutral"]
    assert var["gene_role"].value_counts().to_dict() == {
        "driver": 6,
        "target": 48,
        "housekeeping": 50,
        "neutral": 496,
    }
    assert var["is_state_gene"].dtype == bool
    np.testing.assert_array_equal(var["is_state_gene"], var["gene_role"].isin(["driver", "target"]))

    drivers = var[var["gene_role"] == "driver"]
    targets = var[var["gene_role"] == "target"]
    assert sorted(drivers["gene_symbol"]) == [f"DRV{d}" for d in range(1, 7)]
    np.testing.assert_array_equal(drivers["true_effect"], 2.0)
    assert (var.loc[var["gene_role"] != "target", "driver_of"] == "").all()
    # Each target names its driver by ID, and its symbol carries the driver's number.
    driver_symbol = var.loc[targets["driver_of"], "gene_symbol"].to_numpy()
    target_number = targets["gene_symbol"].str.extract(r"^TGT(\d+)_\d+$")[0].to_numpy()
    np.testing.assert_array_equal(driver_symbol, "DRV" + target_number)
    assert targets["driver_of"].value_counts().eq(8).all()
    assert targets["true_effect"].between(1.0, 2.0).all()
    assert (var.loc[~var["is_state_gene"], "true_effect"] == 0).all()

    markers = var[var["marker_of"] != ""]
    assert (markers["gene_role"] == "neutral").all()
    assert markers["marker_of"].value_counts().to_dict() == {"type_1": 50, "type_2": 50}


def test_gene_order_does_not_reveal_roles(adata):
    driver_positions = _positions(adata, "driver")
    assert not np.array_equal(driver_positions, np.arange(6))


def test_deterministic_for_a_seed():
    first = synthetic_states(n_cells=300, n_genes=200, random_state=7)
    second = synthetic_states(n_cells=300, n_genes=200, random_state=7)
    other = synthetic_states(n_cells=300, n_genes=200, random_state=8)
    assert (first.X != second.X).nnz == 0
    pd.testing.assert_frame_equal(first.obs, second.obs)
    pd.testing.assert_frame_equal(first.var, second.var)
    assert (first.X != other.X).nnz > 0
    assert not first.var["gene_symbol"].equals(other.var["gene_symbol"])


def test_random_state_none_records_a_reproducible_seed():
    drawn = synthetic_states(n_cells=200, n_genes=150, random_state=None)
    seed = drawn.uns["synthetic_states"]["random_state"]
    assert isinstance(seed, int) and seed >= 0
    again = synthetic_states(n_cells=200, n_genes=150, random_state=seed)
    assert (drawn.X != again.X).nnz == 0


def test_drivers_up_in_disease_neutral_genes_flat(adata):
    diff = _state_difference(adata)
    role = adata.var["gene_role"].to_numpy()
    # Measured over seeds 0-19: driver differences 1.07-1.27, targets from 0.43, neutral
    # mean |difference| 0.03-0.06 (the compositional shift the docstring describes).
    assert (diff[role == "driver"] > 0.7).all()
    assert (diff[role == "target"] > 0.25).all()
    assert np.abs(diff[role == "neutral"]).mean() < 0.12
    assert np.abs(diff[role == "housekeeping"]).mean() < 0.15


def test_down_drivers_and_their_targets_go_down():
    data = synthetic_states(n_cells=1000, n_down_drivers=2, random_state=3)
    var = data.var
    diff = _state_difference(data)
    down = var.index[var["true_effect"] == -2.0]
    assert len(down) == 2
    assert (var.loc[var["gene_role"] == "driver", "true_effect"] == 2.0).sum() == 4
    assert (diff[var.index.get_indexer(down)] < -0.5).all()
    down_targets = var.index.get_indexer(var.index[var["driver_of"].isin(down)])
    assert (var["true_effect"].to_numpy()[down_targets] < 0).all()
    assert (diff[down_targets] < 0).all()


def test_zero_effect_gives_no_state_difference():
    data = synthetic_states(n_cells=1000, effect_size=0.0, random_state=4)
    diff = _state_difference(data)
    assert (data.var["true_effect"] == 0).all()
    assert np.abs(diff[data.var["is_state_gene"].to_numpy()]).max() < 0.25


def test_targets_follow_their_driver(adata):
    logx = _log_cp10k(adata)
    targets = _positions(adata, "target")
    drivers = adata.var_names.get_indexer(adata.var["driver_of"].to_numpy()[targets])
    disease = _disease(adata)

    def mean_spearman(cells: np.ndarray) -> float:
        return np.mean(
            [
                stats.spearmanr(logx[cells, t], logx[cells, d]).statistic
                for t, d in zip(targets, drivers, strict=True)
            ]
        )

    # Measured over seeds 0-19: 0.40-0.44 over all cells, 0.32-0.36 within disease cells.
    assert mean_spearman(np.ones_like(disease)) > 0.3
    assert mean_spearman(disease) > 0.22


def test_drivers_are_in_disease_cells_token_lists(adata):
    counts = adata.X.toarray()[_disease(adata)]
    drivers = _positions(adata, "driver")
    rank = stats.rankdata(-counts, axis=1)[:, drivers]
    # Measured over seeds 0-19: median ranks at most 224 of 600, expressed in >= 77% of cells.
    assert (np.median(rank, axis=0) <= 300).all()
    assert ((counts[:, drivers] > 0).mean(axis=0) >= 0.7).all()


def test_library_sizes_vary():
    varied = synthetic_states(n_cells=1000, random_state=5).obs["n_counts"]
    fixed = synthetic_states(n_cells=1000, library_size_cv=0.0, random_state=5).obs["n_counts"]
    assert 0.35 < varied.std() / varied.mean() < 0.7
    assert fixed.std() / fixed.mean() < 0.15
    assert 2500 < varied.mean() < 3500


def test_cell_type_markers_mark_their_type():
    data = synthetic_states(n_cells=900, n_cell_types=3, random_state=6)
    logx = _log_cp10k(data)
    cell_type = data.obs["cell_type"].to_numpy()
    assert len(data.obs["cell_type"].cat.categories) == 3
    for name in data.obs["cell_type"].cat.categories:
        markers = np.flatnonzero(data.var["marker_of"] == name)
        inside = logx[cell_type == name][:, markers].mean()
        outside = logx[cell_type != name][:, markers].mean()
        assert inside - outside > 0.5
    single = synthetic_states(n_cells=200, n_cell_types=1, random_state=6)
    assert (single.var["marker_of"] == "").all()


def test_h5ad_round_trip(adata, tmp_path):
    path = tmp_path / "synthetic.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert isinstance(back.X, sparse.csr_matrix)
    assert back.X.dtype == np.float32
    assert (back.X != adata.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.var, adata.var)
    params = adata.uns["synthetic_states"]
    read = back.uns["synthetic_states"]
    assert read.keys() == params.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(read[key], value)


def test_wilcoxon_finds_state_genes(adata):
    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    sc.tl.rank_genes_groups(
        normalised, "state", groups=["disease"], reference="healthy", method="wilcoxon"
    )
    result = sc.get.rank_genes_groups_df(normalised, "disease").set_index("names")
    scores = result.loc[adata.var_names, "scores"].to_numpy()
    state_gene = adata.var["is_state_gene"].to_numpy()
    # Gene-level AUROC of the scores for telling state genes from the rest; 1.0 measured.
    assert _auroc(scores[state_gene], scores[~state_gene]) > 0.95
    top = np.argsort(-scores)[:30]
    assert set(_positions(adata, "driver")) <= set(top)
    # A single driver separates the cells only partly (0.77-0.82 measured): not trivial.
    counts = adata.X.toarray()
    disease = _disease(adata)
    for driver in _positions(adata, "driver"):
        assert _auroc(counts[disease, driver], counts[~disease, driver]) > 0.65


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_genes": 100}, ValueError, r"n_genes=100 is too small.*take 104.*n_genes >= 106"),
        ({"n_genes": 104, "n_cell_types": 3}, ValueError, r"at least 3 neutral"),
        ({"n_drivers": 0}, ValueError, r"n_drivers must be at least 1"),
        ({"n_down_drivers": 7}, ValueError, r"n_down_drivers=7 is more than n_drivers=6"),
        ({"n_targets_per_driver": -1}, ValueError, r"n_targets_per_driver must be at least 0"),
        ({"disease_fraction": 0.0}, ValueError, r"strictly between 0 and 1"),
        ({"disease_fraction": 1.2}, ValueError, r"strictly between 0 and 1"),
        ({"disease_fraction": float("nan")}, ValueError, r"disease_fraction must be finite"),
        ({"n_cells": 10, "disease_fraction": 0.9}, ValueError, r"1 'healthy' cells.*n_donors"),
        ({"n_cell_types": 0}, ValueError, r"n_cell_types must be at least 1"),
        ({"effect_size": -1.0}, ValueError, r"effect_size must be at least 0"),
        ({"mean_library_size": 0}, ValueError, r"mean_library_size must be positive"),
        ({"mean_library_size": -5.0}, ValueError, r"mean_library_size must be positive"),
        ({"library_size_cv": -0.1}, ValueError, r"library_size_cv must be at least 0"),
        ({"dispersion": -0.5}, ValueError, r"dispersion must be at least 0"),
        ({"dispersion": "high"}, TypeError, r"dispersion must be a number"),
        ({"n_cells": 100.0}, TypeError, r"n_cells must be an integer"),
        ({"n_donors": True}, TypeError, r"n_donors must be an integer"),
        ({"random_state": -1}, ValueError, r"random_state must be at least 0"),
        ({"state_names": "healthy"}, ValueError, r"state_names must be two labels"),
        ({"state_names": ("a", "b", "c")}, ValueError, r"state_names must be two labels"),
        ({"state_names": ("a", "a")}, ValueError, r"two different labels"),
        ({"state_names": ("a", 1)}, TypeError, r"two non-empty strings"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        synthetic_states(**kwargs)


def test_custom_state_names_and_fraction():
    data = synthetic_states(
        n_cells=400, state_names=("control", "stimulated"), disease_fraction=0.25, random_state=2
    )
    assert list(data.obs["state"].cat.categories) == ["control", "stimulated"]
    assert data.obs["state"].value_counts().to_dict() == {"control": 300, "stimulated": 100}
    assert data.uns["synthetic_states"]["state_names"] == ["control", "stimulated"]
