"""Hostile input and faults at the public API (issue 12): each gets a clear error or is handled.

Every test here failed before its fix. None catches an exception to pass: errors are asserted
with ``pytest.raises(..., match=...)`` on the package's own message.
"""

from __future__ import annotations

import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scgeneformer as sgf

from .test_in_silico import TINY


@pytest.fixture(scope="module")
def small():
    """A tiny model and tokenized two-state cells; tests copy ``adata`` before changing it."""
    adata = sgf.datasets.synthetic_states(n_cells=60, n_genes=120, random_state=5)
    vocab = sgf.Vocabulary.build(adata, max_length=128)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    sgf.pp.rank_tokenize(adata, vocab)
    return adata, model


def quick_screen(adata, model, start: str, goal: str, **kwargs) -> None:
    """Delete four genes from two start cells toward ``goal``: the smallest screen that runs."""
    sgf.tl.in_silico_delete(
        adata,
        model,
        state_key="state",
        start_state=start,
        goal_state=goal,
        genes=list(model.vocab.genes[:4]),
        max_cells=2,
        min_cells=1,
        n_null_genes=0,
        **kwargs,
    )


# ---------------------------------------------------------------- item 6: train/eval race
def test_threads_embedding_one_training_mode_model_see_no_dropout_and_leave_its_mode(small):
    adata, model = small
    model = sgf.Geneformer.from_config(
        "V1-10M",
        model.vocab,
        random_state=1,
        **{**TINY, "hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5},
    )
    reference = adata.copy()
    sgf.tl.embed(reference, model.eval())
    model.train()
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        copy = adata.copy()
        for _ in range(3):
            sgf.tl.embed(copy, model, token_budget=256)
        results[i] = copy.obsm["X_geneformer"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert model.training  # inference never flips the shared module's mode
    for out in results.values():
        np.testing.assert_allclose(out, reference.obsm["X_geneformer"], rtol=1e-5, atol=1e-6)


def test_dropout_still_runs_in_training_outside_inference(small):
    _, model = small
    layer = sgf.model._encoder.Dropout(0.5).train()
    out = layer(torch.ones(1000))
    assert (out == 0).any()  # the subclass is still dropout when it should be
    with sgf.model._encoder.dropout_disabled():
        assert (layer(torch.ones(1000)) == 1).all()
    assert model.training is model.training  # nothing global was touched


# ---------------------------------------------------------------- item 2: non-finite pooling
def test_embed_warns_when_cells_with_tokens_pool_to_nan(small):
    adata, model = small
    broken = sgf.Geneformer.from_config("V1-10M", model.vocab, random_state=0, **TINY)
    with torch.no_grad():
        broken.bert.encoder.layer[0].output.dense.bias.fill_(float("nan"))
    adata = adata.copy()
    with pytest.warns(UserWarning, match=r"60 of 60 cells with tokens pooled to a non-finite"):
        sgf.tl.embed(adata, broken)


# ---------------------------------------------------------------- item 7: key_added collisions
@pytest.mark.parametrize(
    ("tool", "key"),
    [
        ("embed", "geneformer_tokens"),
        ("embed", "geneformer"),
        ("in_silico_delete", "geneformer"),
    ],
)
def test_key_added_on_a_token_slot_is_refused_before_any_work(small, tool, key):
    adata, model = small
    adata = adata.copy()
    tokens = adata.obsm["geneformer_tokens"].copy()
    with pytest.raises(ValueError, match=rf"key_added='{key}'.*holds the tokenization"):
        getattr(sgf.tl, tool)(adata, model, key_added=key)
    np.testing.assert_array_equal(adata.obsm["geneformer_tokens"], tokens)
    assert "vocabulary_sha256" in adata.uns["geneformer"]


def test_key_added_must_be_a_name(small):
    adata, model = small
    with pytest.raises(TypeError, match="key_added must be a non-empty string, got None"):
        sgf.tl.embed(adata.copy(), model, key_added=None)


# ---------------------------------------------------------------- items 8, 9: state columns
def _int_states(adata, kind: str):
    adata = adata.copy()
    is_disease = (adata.obs["state"] == "disease").to_numpy()
    if kind == "int":
        adata.obs["code"] = is_disease.astype(np.int64)
    elif kind == "categorical":
        adata.obs["code"] = pd.Categorical(is_disease.astype(np.int64))
    else:
        adata.obs["code"] = is_disease
    return adata


@pytest.mark.parametrize(
    ("kind", "start", "goal"),
    [
        ("int", 1, 0),
        ("int", "1", "0"),
        ("categorical", 1, "0"),
        ("bool", True, False),
        ("bool", "True", "False"),
    ],
)
def test_non_string_state_columns_screen_like_strings(small, kind, start, goal):
    adata, model = small
    reference = adata.copy()
    kwargs = dict(max_cells=3, min_cells=1, genes=list(model.vocab.genes[:6]), n_null_genes=0)
    with pytest.warns(UserWarning, match="pretrained encoder"):
        sgf.tl.in_silico_delete(
            reference,
            model,
            state_key="state",
            start_state="disease",
            goal_state="healthy",
            **kwargs,
        )
    coded = _int_states(adata, kind)
    with pytest.warns(UserWarning, match="pretrained encoder"):
        sgf.tl.in_silico_delete(
            coded, model, state_key="code", start_state=start, goal_state=goal, **kwargs
        )
    np.testing.assert_allclose(
        coded.var["in_silico_delete_shift"], reference.var["in_silico_delete_shift"], rtol=1e-6
    )


def test_unknown_state_on_an_int_column_lists_the_states_present_consistently(small):
    adata, model = small
    coded = _int_states(adata, "int")
    with pytest.raises(ValueError, match=r"\['2'\] not found .*present are \['0', '1'\]"):
        sgf.tl.in_silico_delete(coded, model, state_key="code", start_state=2, goal_state=0)


@pytest.mark.parametrize("alts", [("healthy",), ("disease",), ("treated", "treated")])
def test_an_alt_state_named_twice_is_refused(small, alts):
    adata, model = small
    with pytest.raises(ValueError, match="must be states other than start_state"):
        sgf.tl.in_silico_delete(
            adata.copy(),
            model,
            state_key="state",
            start_state="disease",
            goal_state="healthy",
            alt_states=alts,
        )


def test_start_equal_to_goal_is_said_to_be_a_null_screen(small):
    # Not refused: perturbation_stats(mode="vs_null") compares a screen with exactly this.
    adata, model = small
    with pytest.warns(UserWarning, match=r"both 'healthy'.*null screen"):
        quick_screen(adata.copy(), model, "healthy", "healthy")


# ---------------------------------------------------------------- item 10: default lengths fit
def test_the_readme_path_composes_a_built_vocabulary_and_a_v1_model():
    adata = sgf.datasets.synthetic_states(n_cells=30, n_genes=120, random_state=2)
    vocab = sgf.Vocabulary.build(adata)  # default max_length 4096
    model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=1)
    assert model.vocab.max_length == 2048 and model.vocab.sha256 == vocab.sha256
    assert vocab.max_length == 4096  # the user's object is left as it was
    sgf.tl.embed(adata, model)
    assert np.isfinite(adata.obsm["X_geneformer"]).all()


def test_a_chosen_max_length_too_long_for_the_model_is_still_refused():
    adata = sgf.datasets.synthetic_states(n_cells=30, n_genes=120, random_state=2)
    vocab = sgf.Vocabulary.build(adata, max_length=4096)
    with pytest.raises(ValueError, match=r"max_length=4096 was chosen.*2048 positions"):
        sgf.Geneformer.from_config("V1-10M", vocab)


def test_from_pretrained_refuses_a_too_long_vocabulary_before_embed_writes_tokens(small, tmp_path):
    _, model = small
    model.save(tmp_path / "model")
    long = sgf.Vocabulary.load(tmp_path / "model" / "vocab.json")
    long.max_length = 4096
    with pytest.raises(ValueError, match=r"more than the model's 256 positions.*max_length<=256"):
        sgf.Geneformer.from_pretrained(tmp_path / "model", vocab=long)
    default = sgf.Vocabulary(
        dict(zip(long.genes, long.gene_token_ids.tolist(), strict=True)),
        dict(zip(long.genes, long.median_by_token[long.gene_token_ids].tolist(), strict=True)),
        special_tokens=long.special_tokens,
    )  # max_length left at its default, 2048
    loaded = sgf.Geneformer.from_pretrained(tmp_path / "model", vocab=default)
    assert loaded.vocab.max_length == 256


def test_a_saved_vocabulary_remembers_whether_its_length_was_chosen(tmp_path):
    vocab = sgf.Vocabulary({"ENSG1": 2}, {"ENSG1": 1.0})
    vocab.save(tmp_path / "v.json")
    assert not sgf.Vocabulary.load(tmp_path / "v.json").max_length_given
    sgf.Vocabulary({"ENSG1": 2}, {"ENSG1": 1.0}, max_length=64).save(tmp_path / "w.json")
    assert sgf.Vocabulary.load(tmp_path / "w.json").max_length_given


# ---------------------------------------------------------------- item 11: unclear errors
def test_missing_n_tokens_slot_names_it_and_the_fix(small):
    adata, model = small
    adata = adata.copy()
    del adata.obs["geneformer_n_tokens"]
    with pytest.raises(KeyError, match=r"obs\['geneformer_n_tokens'\].*rank_tokenize"):
        sgf.tl.embed(adata, model)


def test_tokens_of_genes_dropped_from_var_warn(small):
    adata, model = small
    kept = adata[:, 10:].copy()
    with pytest.warns(UserWarning, match=r"holds \d+ genes that adata.var no longer has"):
        sgf.tl.embed(kept, model)


def test_float16_counts_tokenize_as_float32_counts(small):
    adata, model = small
    half = adata.copy()
    half.X = half.X.toarray().astype(np.float16)  # scipy has no float16 sparse type at all
    sgf.pp.rank_tokenize(half, model.vocab)
    np.testing.assert_array_equal(half.obsm["geneformer_tokens"], adata.obsm["geneformer_tokens"])


class _LazyRows:
    """What a dask array of sparse chunks gives the reader: row slices that compute."""

    def __init__(self, matrix):
        self.matrix, self.shape, self.dtype = matrix, matrix.shape, matrix.dtype

    def __getitem__(self, rows):
        block = self.matrix[rows]
        return type("Lazy", (), {"compute": lambda _self: block, "dtype": block.dtype})()


def test_lazily_computed_sparse_chunks_are_read_one_block_at_a_time(small):
    from scgeneformer.pp._chunks import CountSource, iter_csr_chunks

    adata, _ = small
    chunks = list(iter_csr_chunks(CountSource(_LazyRows(adata.X), "adata.X"), 25))
    assert [start for start, _ in chunks] == [0, 25, 50]
    stacked = np.vstack([chunk.toarray() for _, chunk in chunks])
    np.testing.assert_array_equal(stacked, adata.X.toarray())


def test_a_dask_array_of_sparse_chunks_tokenizes_like_the_counts_in_memory(small):
    import dask.array as da
    import scipy.sparse as sp

    adata, model = small
    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    lazy = ad.AnnData(
        X=da.from_array(counts, chunks=(17, counts.shape[1])).map_blocks(sp.csr_matrix),
        obs=adata.obs[[]].copy(),
        var=adata.var[[]].copy(),
    )
    sgf.pp.rank_tokenize(lazy, model.vocab)
    np.testing.assert_array_equal(lazy.obsm["geneformer_tokens"], adata.obsm["geneformer_tokens"])


def test_a_token_id_far_beyond_any_embedding_table_is_refused():
    with pytest.raises(ValueError, match=r"maps 'ENSG2' to 1099511627776, outside 0\.\."):
        sgf.Vocabulary.from_geneformer(
            {"<pad>": 0, "<mask>": 1, "ENSG1": 2, "ENSG2": 2**40}, {"ENSG1": 1.0, "ENSG2": 1.0}
        )


def test_a_symbol_dictionary_given_as_token_dictionary_says_so():
    with pytest.raises(ValueError, match=r"text rather than a token id.*mapping_dict"):
        sgf.Vocabulary.from_geneformer(
            {"CD3E": "ENSG00000198851", "MS4A1": "ENSG00000156738"}, {"ENSG00000198851": 1.0}
        )


def test_max_cells_zero_is_refused(small):
    adata, model = small
    with pytest.raises(ValueError, match="max_cells must be a whole number of at least 1"):
        sgf.tl.in_silico_delete(adata.copy(), model, max_cells=0)


@pytest.mark.parametrize("tool", ["embed", "in_silico_delete"])
def test_token_budget_zero_is_refused_before_tokenizing(small, tool):
    adata, model = small
    untokenized = adata.copy()
    del untokenized.obsm["geneformer_tokens"]
    with pytest.raises(ValueError, match="token_budget must be at least 1"):
        getattr(sgf.tl, tool)(untokenized, model, token_budget=0)
    assert "geneformer_tokens" not in untokenized.obsm  # nothing was tokenized first


def test_a_dtype_the_cpu_lacks_warns_and_the_record_says_what_ran(small):
    adata, model = small
    adata = adata.copy()
    with pytest.warns(UserWarning, match="dtype='float16' cannot run on CPU: running float32"):
        sgf.tl.embed(adata, model, device="cpu", dtype="float16")
    assert adata.uns["X_geneformer"]["dtype"] == "float32"
    assert adata.uns["X_geneformer"]["execution_plan"]["requested_dtype"] == "float16"


# ---------------------------------------------------------------- item 15: the command line
@pytest.fixture(scope="module")
def cli_files(small, tmp_path_factory):
    adata, model = small
    folder = tmp_path_factory.mktemp("cli")
    model.save(folder / "model")
    model.vocab.save(folder / "vocab.json")
    adata.write_h5ad(folder / "cells.h5ad")
    negative = adata.copy()
    del negative.obsm["geneformer_tokens"]
    negative.X = negative.X.toarray()
    negative.X[0, 0] = -3
    negative.write_h5ad(folder / "negative.h5ad")
    return folder


def _one_line_error(capsys, argv: list[str]) -> str:
    from scgeneformer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_missing_input_file_is_one_line(cli_files, capsys):
    err = _one_line_error(
        capsys,
        ["embed", str(cli_files / "absent.h5ad"), "out.h5ad", "--model", str(cli_files / "model")],
    )
    assert "absent.h5ad" in err


def test_cli_folder_that_is_no_model_is_one_line(cli_files, capsys, tmp_path):
    err = _one_line_error(
        capsys,
        [
            "embed",
            str(cli_files / "cells.h5ad"),
            str(tmp_path / "o.h5ad"),
            "--model",
            str(tmp_path),
        ],
    )
    assert "has no config.json" in err


def test_cli_directory_as_input_is_one_line(cli_files, capsys, tmp_path):
    _one_line_error(
        capsys,
        [
            "tokenize",
            str(tmp_path),
            str(tmp_path / "o.h5ad"),
            "--vocab",
            str(cli_files / "vocab.json"),
        ],
    )


def test_cli_negative_counts_are_one_line(cli_files, capsys, tmp_path):
    err = _one_line_error(
        capsys,
        [
            "tokenize",
            str(cli_files / "negative.h5ad"),
            str(tmp_path / "o.h5ad"),
            "--vocab",
            str(cli_files / "vocab.json"),
        ],
    )
    assert "negative values" in err and not (tmp_path / "o.h5ad").exists()


def test_cli_debug_shows_the_traceback(cli_files):
    from scgeneformer.cli import main

    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        main(
            ["--debug", "embed", str(cli_files / "cells.h5ad"), "o.h5ad", "--model", str(cli_files)]
        )


def test_a_bug_deep_in_a_library_keeps_its_traceback(monkeypatch):
    import argparse

    from scgeneformer._cli_errors import run_reporting_errors

    def crash(args):
        return np.zeros(2).reshape(3)  # numpy's ValueError: not the user's mistake

    with pytest.raises(ValueError, match="cannot reshape"):
        run_reporting_errors(argparse.Namespace(debug=False, run=crash))


def test_a_busy_run_folder_is_one_line_on_the_command_line(tmp_path, capsys):
    import argparse

    from scgeneformer._cli_errors import run_reporting_errors
    from scgeneformer.train._run_lock import lock_run_folder

    held = lock_run_folder(tmp_path)  # as a run in progress holds it
    try:

        def second_run(args):
            lock_run_folder(tmp_path)

        code = run_reporting_errors(argparse.Namespace(debug=False, run=second_run))
    finally:
        held.release()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "pid" in err


# ---------------------------------------------------------------- more hostile input
def test_n_tokens_wider_than_the_token_rows_is_refused_not_misread(small):
    adata, model = small
    adata = adata.copy()
    adata.obsm["geneformer_tokens"] = adata.obsm["geneformer_tokens"][:, :5]  # edited by hand
    with pytest.raises(ValueError, match=r"obs\['geneformer_n_tokens'\] holds .* do not belong"):
        sgf.tl.embed(adata, model)


def test_nan_in_n_tokens_is_refused(small):
    adata, model = small
    adata = adata.copy()
    adata.obs["geneformer_n_tokens"] = adata.obs["geneformer_n_tokens"].astype(float)
    adata.obs.iloc[3, adata.obs.columns.get_loc("geneformer_n_tokens")] = np.nan
    with pytest.raises(ValueError, match=r"holds nan for cell .*whole numbers"):
        sgf.tl.embed(adata, model)


def test_listed_genes_missing_from_var_warn_instead_of_silent_nan(small):
    adata, model = small
    raw = adata[:, 10:].copy()
    del raw.obsm["geneformer_tokens"]  # tokenized afresh on the genes kept
    listed = list(adata.var_names[:3])  # in the vocabulary, gone from var
    with pytest.warns(UserWarning, match=r"3 of the 3 listed genes are not among adata\.var"):
        sgf.tl.in_silico_delete(raw, model, genes=listed, max_cells=2, min_cells=1, n_null_genes=0)


def test_alt_states_given_as_one_string_is_one_state(small):
    adata, model = small
    adata = adata.copy()
    states = adata.obs["state"].astype(str).to_numpy()
    states[:10] = "treated"
    adata.obs["state"] = pd.Categorical(states)
    with pytest.warns(UserWarning, match="pretrained encoder"):
        quick_screen(adata, model, "disease", "healthy", alt_states="treated")
    assert "in_silico_delete_shift_treated" in adata.var
    assert adata.uns["in_silico_delete"]["alt_states"] == ["treated"]


def test_an_unused_category_as_start_state_lists_only_states_with_cells(small):
    adata, model = small
    adata = adata.copy()
    adata.obs["state"] = pd.Categorical(
        adata.obs["state"], categories=["disease", "healthy", "treated"]
    )
    with pytest.raises(ValueError, match=r"\['treated'\] not found.*\['disease', 'healthy'\]\."):
        sgf.tl.in_silico_delete(
            adata, model, state_key="state", start_state="treated", goal_state="healthy"
        )


def test_start_state_whose_cells_all_lack_tokens_is_named(small):
    adata, model = small
    adata = adata.copy()
    disease = (adata.obs["state"] == "disease").to_numpy()
    adata.obsm["geneformer_tokens"][disease] = 0
    adata.obs.loc[disease, "geneformer_n_tokens"] = 0
    with pytest.raises(ValueError, match="'disease' of obs\\['state'\\] has no cells with tokens"):
        sgf.tl.in_silico_delete(
            adata, model, state_key="state", start_state="disease", goal_state="healthy"
        )


def test_missing_state_labels_are_no_state(small):
    adata, model = small
    adata = adata.copy()
    states = adata.obs["state"].astype(object).copy()
    states.iloc[:5] = np.nan
    adata.obs["state"] = states
    with pytest.warns(UserWarning, match="pretrained encoder"):
        quick_screen(adata, model, "disease", "healthy")
    start = adata.uns["in_silico_delete"]["n_start_cells_total"]
    assert start == int((states == "disease").sum())


def test_integer_sparse_counts_with_int64_indices_tokenize_as_floats(small):
    import scipy.sparse as sp

    adata, model = small
    ints = adata.copy()
    matrix = sp.csr_matrix(ints.X.astype(np.int32))
    matrix.indices = matrix.indices.astype(np.int64)
    matrix.indptr = matrix.indptr.astype(np.int64)
    ints.X = matrix
    sgf.pp.rank_tokenize(ints, model.vocab)
    np.testing.assert_array_equal(ints.obsm["geneformer_tokens"], adata.obsm["geneformer_tokens"])


def test_duplicated_cell_names_keep_the_input_order(small):
    adata, model = small
    named = adata.copy()
    sgf.tl.embed(named, model)
    same = adata.copy()
    same.obs_names = ["cell"] * same.n_obs
    sgf.tl.embed(same, model)
    np.testing.assert_array_equal(same.obsm["X_geneformer"], named.obsm["X_geneformer"])


def test_embedding_a_view_leaves_its_parent_untouched(small):
    adata, model = small
    parent = adata.copy()
    before = set(parent.obsm), set(parent.uns)
    view = parent[:20]
    sgf.tl.embed(view, model)
    assert view.obsm["X_geneformer"].shape == (20, model.hidden_size)
    assert (set(parent.obsm), set(parent.uns)) == before


def test_a_backed_anndata_embeds(small, tmp_path):
    import anndata as ad

    adata, model = small
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    sgf.tl.embed(backed, model)
    memory = adata.copy()
    sgf.tl.embed(memory, model)
    np.testing.assert_allclose(backed.obsm["X_geneformer"], memory.obsm["X_geneformer"], atol=1e-6)


@pytest.mark.parametrize(
    ("budget", "error"), [("big", TypeError), (2.5, TypeError), (-1, ValueError)]
)
def test_token_budget_must_be_a_whole_positive_number(small, budget, error):
    adata, model = small
    with pytest.raises(error, match="token_budget must be"):
        sgf.tl.embed(adata.copy(), model, token_budget=budget)


def test_a_whole_float_token_budget_is_accepted(small):
    adata, model = small
    adata = adata.copy()
    sgf.tl.embed(adata, model, token_budget=1e4)
    assert np.isfinite(adata.obsm["X_geneformer"]).all()


def test_an_empty_key_added_is_refused(small):
    adata, model = small
    with pytest.raises(TypeError, match="key_added must be a non-empty string, got ''"):
        sgf.tl.in_silico_delete(adata.copy(), model, key_added="")
