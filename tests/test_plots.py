"""The plots' contents and layout: what they draw equals the data, and nothing overlaps."""

from __future__ import annotations

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

import scgeneformer as sgf

from .test_in_silico import states_data  # noqa: F401  (the shared fixture)

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def overlaps(a, b) -> bool:
    """Whether two display-space boxes share any area (touching edges do not count)."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# ------------------------------------------------------------------ embedding_heatmap
@pytest.fixture
def embedded():
    rng = np.random.default_rng(0)
    labels = np.array(["T", "B", "NK", "B", "T", "T", "B", "NK", "T", "B"] * 3)
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(30)]))
    adata.obs["cell_type"] = pd.Categorical(labels, categories=["T", "B", "NK"])
    adata.obsm["X_geneformer"] = rng.normal(size=(30, 6)) * np.array([1, 10, 100, 1, 1, 0.1])
    return adata


def test_heatmap_draws_the_embedding_ordered_by_group(embedded):
    ax = sgf.pl.embedding_heatmap(embedded, groupby="cell_type", standard_scale=None, show=False)
    labels = embedded.obs["cell_type"].to_numpy()
    # Categories in their own order (T, B, NK), input order within a group.
    order = np.concatenate([np.flatnonzero(labels == g) for g in ["T", "B", "NK"]])
    drawn = np.asarray(ax.images[0].get_array())
    np.testing.assert_array_equal(drawn, embedded.obsm["X_geneformer"][order])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T", "B", "NK"]
    # The group bar beside it has one code per drawn row, the same rows.
    (bar,) = [child for child in ax.child_axes if child.images and child.get_ylabel()]
    codes = np.asarray(bar.images[0].get_array()).ravel()
    np.testing.assert_array_equal(codes, embedded.obs["cell_type"].cat.codes.to_numpy()[order])
    assert bar.get_ylabel() == "30 cells, grouped by cell_type"


def test_heatmap_scales_each_dimension_to_its_range(embedded):
    ax = sgf.pl.embedding_heatmap(embedded, groupby="cell_type", show=False)
    drawn = np.asarray(ax.images[0].get_array())
    np.testing.assert_allclose(drawn.min(axis=0), 0.0)
    np.testing.assert_allclose(drawn.max(axis=0), 1.0)
    values = embedded.obsm["X_geneformer"]
    labels = embedded.obs["cell_type"].to_numpy()
    order = np.concatenate([np.flatnonzero(labels == g) for g in ["T", "B", "NK"]])
    low, high = values.min(axis=0), values.max(axis=0)
    np.testing.assert_allclose(drawn, (values[order] - low) / (high - low))


def test_heatmap_subsamples_each_group_and_keeps_input_order(embedded):
    before = embedded.copy()
    ax = sgf.pl.embedding_heatmap(
        embedded,
        groupby="cell_type",
        basis="geneformer",
        max_cells_per_group=4,
        standard_scale=None,
        random_state=1,
        show=False,
    )
    drawn = np.asarray(ax.images[0].get_array())
    values, labels = embedded.obsm["X_geneformer"], embedded.obs["cell_type"].to_numpy()
    rows = [int(np.flatnonzero((values == row).all(axis=1))[0]) for row in drawn]
    assert [labels[r] for r in rows] == ["T"] * 4 + ["B"] * 4 + ["NK"] * 4  # NK has 6, not 4
    for group in ("T", "B", "NK"):
        picked = [r for r in rows if labels[r] == group]
        assert picked == sorted(picked)
    again = sgf.pl.embedding_heatmap(
        embedded,
        groupby="cell_type",
        max_cells_per_group=4,
        standard_scale=None,
        random_state=1,
        show=False,
    )
    np.testing.assert_array_equal(np.asarray(again.images[0].get_array()), drawn)
    # The AnnData is left as it was (no colours written to uns, no columns added).
    assert embedded.uns.keys() == before.uns.keys()
    pd.testing.assert_frame_equal(embedded.obs, before.obs)


def test_heatmap_legend_and_scale_stand_clear_of_the_data(embedded, tmp_path):
    # Grouped by a string column (no categories): sorted groups, nine of them.
    embedded.obs["cluster"] = [f"cluster {i % 9}" for i in range(embedded.n_obs)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for ax in axes:
        sgf.pl.embedding_heatmap(embedded, groupby="cluster", ax=ax, show=False)
    fig.savefig(tmp_path / "two.png")
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        legend = ax.get_legend().get_window_extent(renderer)
        scale = ax.images[0].colorbar.ax
        assert not overlaps(legend, ax.get_window_extent(renderer))
        assert not overlaps(legend, scale.get_tightbbox(renderer))  # ticks and label included
        assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["cluster 0", "cluster 1"]
    # The left panel's legend does not run into the right panel.
    left_legend = axes[0].get_legend().get_window_extent(renderer)
    assert not overlaps(left_legend, axes[1].get_tightbbox(renderer))


def test_heatmap_says_what_is_missing(embedded):
    with pytest.raises(KeyError, match=r"no 'X_pca'.*\['X_geneformer'\].*sgf\.tl\.embed"):
        sgf.pl.embedding_heatmap(embedded, groupby="cell_type", basis="X_pca")
    with pytest.raises(KeyError, match=r"no column 'donor'.*\['cell_type'\]"):
        sgf.pl.embedding_heatmap(embedded, groupby="donor")
    with pytest.raises(ValueError, match="max_cells_per_group"):
        sgf.pl.embedding_heatmap(embedded, groupby="cell_type", max_cells_per_group=0)
    partly = embedded.copy()
    partly.obs.loc[partly.obs_names[:3], "cell_type"] = np.nan
    with pytest.warns(UserWarning, match="3 of 30 cells have no 'cell_type' label"):
        ax = sgf.pl.embedding_heatmap(partly, groupby="cell_type", show=False)
    assert ax.images[0].get_array().shape == (27, 6)


def test_heatmap_uses_scanpys_group_colours_and_saves(embedded, tmp_path):
    embedded.uns["cell_type_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    path = tmp_path / "heatmap.png"
    sgf.pl.embedding_heatmap(embedded, groupby="cell_type", save=path, show=False)
    assert path.stat().st_size > 0
    ax = sgf.pl.embedding_heatmap(embedded, groupby="cell_type", show=False)
    colours = [h.get_facecolor()[:3] for h in ax.get_legend().legend_handles]
    assert colours == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]


# ------------------------------------------------------------------ deletion_volcano
def crowded_screen(n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """A screen's var columns by hand: many genes of nearly one shift and one FDR."""
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(np.zeros((1, n_genes)))
    adata.var_names = [f"GENE{i:02d}LONGNAME" for i in range(n_genes)]
    key = "in_silico_delete"
    shift = 0.01 + rng.normal(0, 1e-4, n_genes)
    shift[:5] = [0.05, -0.02, 0.002, 0.0101, 0.0099]  # a few spread out
    adata.var[f"{key}_shift"] = shift
    adata.var[f"{key}_zscore"] = np.linspace(8, 0, n_genes)
    fdr = 10.0 ** -(6 + rng.normal(0, 0.02, n_genes))
    adata.var[f"{key}_pval"] = adata.var[f"{key}_fdr"] = fdr
    adata.var[f"{key}_n_cells"] = 10
    adata.uns[key] = {"start_state": "stim", "goal_state": "ctrl", "mode": "delete"}
    return adata


@pytest.mark.parametrize("size", [(6, 4.5), (3.5, 3)])
def test_volcano_labels_never_overlap_in_a_crowd(size, tmp_path):
    adata = crowded_screen()
    _, ax = plt.subplots(figsize=size)
    sgf.pl.deletion_volcano(adata, n_labels=20, ax=ax, save=tmp_path / "v.png", show=False)
    renderer = ax.figure.canvas.get_renderer()
    texts = ax.texts
    assert [t.get_text() for t in texts] == adata.var_names[:20].tolist()  # top by z-score
    # The text's own box (an Annotation's extent would include its leader line).
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not overlaps(a, b), (a, b)
    # Each label still points at its own gene: the annotation's anchor is the gene's point.
    for text, (shift, fdr) in zip(
        texts,
        adata.var[["in_silico_delete_shift", "in_silico_delete_fdr"]].to_numpy()[:20],
        strict=True,
    ):
        assert text.xy == pytest.approx((shift, -np.log10(fdr)))
    # The legend stands outside the data, to the right.
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1 - 1


def test_tiny_shifts_carry_their_power_of_ten_in_the_axis_label():
    adata = crowded_screen(n_genes=5)
    adata.var["in_silico_delete_shift"] *= 1e-3  # shifts of about 1e-5
    ax = sgf.pl.deletion_ranking(adata, sort_by="shift", show=False)
    assert ax.get_xlabel() == r"mean shift toward the goal (cosine, $\times 10^{-5}$)"
    ax.figure.canvas.draw()
    ticks = {t.get_position()[0]: t.get_text() for t in ax.get_xticklabels() if t.get_text()}
    for value, text in ticks.items():  # "2" at 2e-5: the label and the ticks agree
        assert float(text.replace("\N{MINUS SIGN}", "-")) == pytest.approx(value * 1e5)
    assert not ax.xaxis.get_offset_text().get_text()  # no "1e-5" of its own beside the axis


def test_volcano_without_crowding_keeps_labels_beside_their_genes():
    adata = crowded_screen(n_genes=5)
    adata.var["in_silico_delete_fdr"] = [1e-8, 1e-6, 1e-4, 1e-3, 1e-2]  # far apart
    ax = sgf.pl.deletion_volcano(adata, n_labels=5, show=False)
    ax.figure.canvas.draw()  # annotations take their places when drawn
    renderer = ax.figure.canvas.get_renderer()
    for text in ax.texts:
        box = Text.get_window_extent(text, renderer)
        point = ax.transData.transform(text.xy)
        assert abs(box.y0 + box.height / 2 - point[1]) < box.height  # on its gene's level
        assert text.arrow_patch is None  # no leader line needed


# ------------------------------------------------------------------ first_order screens
@pytest.fixture(scope="module")
def first_order_screen(states_data):  # noqa: F811  (the fixture imported above)
    adata, model = states_data
    adata = adata.copy()
    with pytest.warns(UserWarning, match="never fine-tuned"):  # the plots need no trained model
        sgf.tl.in_silico_delete(
            adata,
            model,
            method="first_order",
            state_key="state",
            start_state="disease",
            goal_state="healthy",
            max_cells=6,
            min_cells=2,
            random_state=0,
        )
    return adata


def bars(ax) -> tuple[list[str], np.ndarray]:
    """The genes and bar lengths of a ranking, top first."""
    genes = [t.get_text() for t in ax.get_yticklabels()][::-1]
    return genes, np.array([p.get_width() for p in ax.patches])[::-1]


def test_first_order_ranking_plots_the_estimates(first_order_screen):
    adata = first_order_screen
    var = adata.var
    assert var["in_silico_delete_shift"].isna().all()  # nothing was deleted exactly
    tested = var[var["in_silico_delete_n_cells"] >= 2]
    expected = tested["in_silico_delete_estimate"].sort_values(ascending=False, kind="stable")

    ax = sgf.pl.deletion_ranking(adata, sort_by="shift", n_top=12, gene_symbols=None, show=False)
    genes, lengths = bars(ax)
    assert genes == expected.index[:12].tolist()
    np.testing.assert_allclose(lengths, expected.to_numpy()[:12])
    assert ax.get_xlabel().startswith("mean first-order estimate of the shift toward the goal")
    # "estimate" asks for the same thing by its name.
    same = sgf.pl.deletion_ranking(
        adata, sort_by="estimate", n_top=12, gene_symbols=None, show=False
    )
    assert bars(same)[0] == genes

    # The default order: the z-scores, which are of the estimates, and say so.
    ax = sgf.pl.deletion_ranking(adata, n_top=8, gene_symbols=None, show=False)
    genes, lengths = bars(ax)
    zscores = tested["in_silico_delete_zscore"].sort_values(ascending=False, kind="stable")
    assert genes == zscores.index[:8].tolist()
    np.testing.assert_allclose(lengths, zscores.to_numpy()[:8])
    assert "first-order estimates" in ax.get_xlabel()


def test_first_order_volcano_places_genes_at_their_estimates(first_order_screen):
    adata = first_order_screen
    ax = sgf.pl.deletion_volcano(
        adata, fdr_threshold=1.01, n_labels=5, gene_symbols=None, show=False
    )
    assert "first-order estimate" in ax.get_xlabel()
    tested = adata.var[adata.var["in_silico_delete_n_cells"] >= 2]
    drawn = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    np.testing.assert_allclose(
        np.sort(drawn), np.sort(tested["in_silico_delete_estimate"].to_numpy())
    )
    top = tested["in_silico_delete_zscore"].nlargest(5).index
    for text, gene in zip(ax.texts, top, strict=True):
        assert text.get_text() == gene
        assert text.xy[0] == pytest.approx(tested.loc[gene, "in_silico_delete_estimate"])


def test_an_exact_screen_has_no_estimate_to_sort_by(first_order_screen):
    adata = first_order_screen.copy()
    adata.var["in_silico_delete_shift"] = adata.var["in_silico_delete_estimate"]
    del adata.var["in_silico_delete_estimate"]
    with pytest.raises(ValueError, match="made no first-order estimates"):
        sgf.pl.deletion_ranking(adata, sort_by="estimate", show=False)
