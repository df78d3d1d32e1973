"""tl.tune_finetune: a few Optuna trials on a tiny model, the best refitted; bad input."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

import scgeneformer as sgf

from .test_finetune import tiny_model

matplotlib.use("Agg")

SPACE = {"lr": (1e-4, 3e-3, "log"), "epochs": (1, 3), "freeze_layers": [0, 1]}


@pytest.fixture(scope="module")
def small():
    adata = sgf.datasets.synthetic_states(n_cells=120, n_genes=200, n_donors=5, random_state=2)
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    return adata, vocab


@pytest.fixture(scope="module")
def tuned(small):
    adata, vocab = small
    adata = adata.copy()
    clf = sgf.tl.tune_finetune(
        adata,
        tiny_model(vocab),
        label_key="state",
        group_key="donor",
        search_space=SPACE,
        n_trials=4,
        token_budget=512,
        random_state=0,
    )
    return adata, clf


def test_the_best_trials_settings_are_refitted_and_returned(tuned):
    adata, clf = tuned
    result = adata.uns["state_tune"]
    trials = result["trials"]
    assert trials["number"] == [0, 1, 2, 3]
    values = np.asarray(trials["value"], dtype=float)
    best = int(np.nanargmax(values))
    assert result["best_trial"] == best and result["best_value"] == values[best]
    assert result["best_params"] == {name: trials[name][best] for name in SPACE}
    # The returned classifier was trained with those settings on the same split and seed, so
    # its best validation macro-F1 is the best trial's.
    params = adata.uns["state_finetune"]["params"]
    assert params["lr"] == pytest.approx(result["best_params"]["lr"])
    assert params["epochs"] == result["best_params"]["epochs"]
    assert params["freeze_layers"] == result["best_params"]["freeze_layers"]
    best_epoch = max(record["macro_f1"] for record in clf.history["eval"])
    assert best_epoch == pytest.approx(result["best_value"])
    assert clf.training_args["tuned"]["best_trial"] == best
    assert "baseline" in adata.uns["state_finetune"]  # scored on the untouched test cells


def test_the_search_is_reproducible_with_random_state(tuned, small):
    adata, vocab = small
    again = adata.copy()
    sgf.tl.tune_finetune(
        again,
        tiny_model(vocab),
        label_key="state",
        group_key="donor",
        search_space=SPACE,
        n_trials=2,
        token_budget=512,
        random_state=0,
    )
    first = tuned[0].uns["state_tune"]["trials"]
    second = again.uns["state_tune"]["trials"]
    for name in ("value", *SPACE):
        assert second[name] == first[name][:2]


def test_tune_trials_plot(tuned, tmp_path):
    adata, _ = tuned
    ax = sgf.pl.tune_trials(adata, "state", show=False)
    assert "best trial" in ax.get_title()
    sgf.pl.tune_trials(adata, "state", save=tmp_path / "trials.png")
    assert (tmp_path / "trials.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"search_space": {"learning_rate": (1e-4, 1e-3)}},
            r"unknown key\(s\) \['learning_rate'\]",
        ),
        ({"search_space": {"lr": (1e-3, 1e-4)}}, r"needs 0 < low < high"),
        ({"search_space": {"freeze_layers": [0, 5]}}, r"reaches 5, but the model has 2 layers"),
        ({"search_space": {"lr": (1e-4, 1e-3)}, "lr": 1e-3}, r"both searched and fixed"),
        ({"n_trials": 0}, r"n_trials must be a whole number of at least 1"),
    ],
)
def test_bad_search_input_is_refused(small, kwargs, message):
    adata, vocab = small
    with pytest.raises(ValueError, match=message):
        sgf.tl.tune_finetune(adata.copy(), tiny_model(vocab), label_key="state", **kwargs)


def test_a_label_column_with_one_class_is_refused(small):
    adata, vocab = small
    adata = adata.copy()
    adata.obs["state"] = "healthy"
    with pytest.raises(ValueError, match=r"holds one class only \('healthy'\)"):
        sgf.tl.tune_finetune(adata, tiny_model(vocab), label_key="state", n_trials=1)
