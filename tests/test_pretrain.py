"""tl.pretrain: it learns, resumes exactly, survives a failed checkpoint, refuses bad input."""

from __future__ import annotations

import json
import re

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers

import scgeneformer as sgf
from scgeneformer.data._masking import GeneMasker, batch_generator
from scgeneformer.data._sources import PaddedTokens
from scgeneformer.data._store_build import build_token_store
from scgeneformer.pl._training import loss_curve
from scgeneformer.pretrain_cli import main as pretrain_main
from scgeneformer.tl import pretrain
from scgeneformer.train import _checkpoints
from scgeneformer.train._checkpoints import list_checkpoints
from scgeneformer.train._pretrain_loop import PretrainRun, _prepare

from .test_token_store import random_cells, write_arrow_dataset

matplotlib.use("Agg")

V2_SPECIAL = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
TINY = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
# Small, quick runs; `run` fills in the rest.
QUICK = {
    "max_steps": 12,
    "warmup_steps": 3,
    "token_budget": 256,
    "save_every": 4,
    "log_every": 2,
    "eval_fraction": 0.1,
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # pytest -n 2 already keeps both cores busy; more threads only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def module_vocab(n_modules=6, module_size=10, name="modules"):
    genes = [f"ENSG{i:011d}" for i in range(1, n_modules * module_size + 1)]
    return sgf.Vocabulary(
        {g: 4 + i for i, g in enumerate(genes)},
        dict.fromkeys(genes, 1.0),
        special_tokens=V2_SPECIAL,
        name=name,
        max_length=64,
    )


def module_corpus(vocab, n_cells, seed=0, n_modules=6):
    """Cells expressing two of a few gene modules, each gene of a module with probability 0.8.

    Modules are contiguous runs of token ids, in a fixed order within a cell: the visible genes
    of a module tell which module it is and so which genes are missing.
    """
    rng = np.random.default_rng(seed)
    modules = vocab.gene_token_ids.reshape(n_modules, -1)
    rows = []
    for _ in range(n_cells):
        genes = []
        for m in rng.choice(n_modules, 2, replace=False):
            genes.extend(modules[m][rng.random(modules.shape[1]) < 0.8].tolist())
        rows.append([vocab.cls_id, *genes, vocab.eos_id])
    return tokens_adata(vocab, rows)


def tokens_adata(vocab, rows):
    tokens = np.zeros((len(rows), max(map(len, rows))), dtype=np.uint16)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(rows))]))
    adata.obsm["geneformer_tokens"] = tokens
    adata.obs["geneformer_n_tokens"] = [len(r) for r in rows]
    adata.uns["geneformer"] = {"vocabulary_sha256": vocab.sha256, "vocabulary_name": vocab.name}
    return adata


def tiny_model(vocab, seed=0, **overrides):
    return sgf.Geneformer.from_config("V1-10M", vocab, random_state=seed, **{**TINY, **overrides})


def params(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------- learning


def test_pretraining_learns_planted_modules(tmp_path):
    vocab = module_vocab()
    adata = module_corpus(vocab, 1500)
    out = tmp_path / "run"
    model = pretrain(
        adata,
        tiny_model(vocab),
        output_dir=out,
        max_steps=300,
        lr=3e-3,
        warmup_steps=30,
        token_budget=2048,
        save_every=100,
        log_every=20,
        eval_fraction=0.1,
    )
    history = model.training_args["history"]
    evaluation = history["eval"]
    assert [e["step"] for e in evaluation] == [100, 200, 300]

    # Frequency-only guesses, from the corpus: the most frequent gene overall, and the most
    # frequent gene at each position.
    tokens = adata.obsm["geneformer_tokens"].astype(np.int64)
    genes = np.isin(tokens, vocab.gene_token_ids)
    overall = np.bincount(tokens[genes]).max() / genes.sum()
    per_position = (
        sum(
            np.bincount(tokens[genes[:, j], j]).max()
            for j in range(tokens.shape[1])
            if genes[:, j].any()
        )
        / genes.sum()
    )
    best_guess = max(overall, per_position)
    assert best_guess < 0.25
    accuracy = evaluation[-1]["accuracy"]
    assert accuracy > 0.6, evaluation
    assert accuracy > best_guess + 0.35, (accuracy, overall, per_position)
    assert evaluation[-1]["frequency_baseline"] == pytest.approx(overall, abs=0.05)
    assert history["train"][-1]["loss"] < 0.5 * history["train"][0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in history["train"])

    # The run folder: history, the final model, the last checkpoints.
    assert json.loads((out / "history.json").read_text()) == history
    assert [s for s, _ in list_checkpoints(out)] == [100, 200, 300]
    loaded = sgf.Geneformer.from_pretrained(out)
    assert_same_params(params(loaded), params(model))
    assert loaded.training_args["history"] == history

    ax = loss_curve(model, show=False)
    assert ax.get_xlabel() == "step" and len(ax.get_lines()) == 1
    twin = next(a for a in ax.figure.axes if a is not ax)
    assert len(twin.get_lines()) == 2  # accuracy and the most-frequent-gene line
    assert loss_curve(out, show=False, save=tmp_path / "curve.png") is not None
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert loss_curve(out / "checkpoints" / "step-00000200", show=False) is not None


# ---------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def small_corpus():
    vocab = module_vocab()
    return vocab, module_corpus(vocab, 200, seed=1)


def run(small_corpus, out, **kwargs):
    vocab, adata = small_corpus
    return pretrain(adata, tiny_model(vocab), output_dir=out, **{**QUICK, **kwargs})


@pytest.fixture(scope="module")
def uninterrupted(small_corpus, tmp_path_factory):
    model = run(small_corpus, tmp_path_factory.mktemp("full") / "run")
    return params(model), model.training_args["history"]


def test_stop_and_resume_equals_an_uninterrupted_run(
    small_corpus, uninterrupted, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    original = PretrainRun._step

    def crash_at_step_7(self, *args):
        if self.step == 6:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(PretrainRun, "_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(small_corpus, out)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [4]

    with pytest.raises(FileExistsError, match="resume=True"):
        run(small_corpus, out)
    resumed = run(small_corpus, out, resume=True)
    full_params, full_history = uninterrupted
    assert_same_params(params(resumed), full_params)
    assert resumed.training_args["history"]["eval"] == full_history["eval"]
    losses = [r["loss"] for r in resumed.training_args["history"]["train"]]
    assert losses == [r["loss"] for r in full_history["train"]]
    # Resuming a finished run changes nothing.
    again = run(small_corpus, out, resume=True)
    assert_same_params(params(again), full_params)


def test_failed_checkpoint_write_keeps_the_previous_one(
    small_corpus, uninterrupted, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    original = _checkpoints._write_trainer_state

    def fail_at_step_8(folder, trainer_state, info):
        if info["step"] == 8:
            (folder / _checkpoints.STATE_PT).write_bytes(b"half a file")
            raise OSError("No space left on device")
        original(folder, trainer_state, info)

    monkeypatch.setattr(_checkpoints, "_write_trainer_state", fail_at_step_8)
    with pytest.raises(OSError, match="No space left"):
        run(small_corpus, out)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [4]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    leftover = out / "checkpoints" / "..step-00000008.tmp-x.tmp-y"  # as a hard kill leaves it
    leftover.mkdir()
    assert json.loads((out / "history.json").read_text())["eval"][-1]["step"] == 4

    resumed = run(small_corpus, out, resume=True)
    assert_same_params(params(resumed), uninterrupted[0])
    assert not leftover.exists()


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    small_corpus, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    run(small_corpus, out, max_steps=8)  # checkpoints at 4 and 8 (schedule of 8 steps)
    (out / "checkpoints" / "step-00000008" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged"):
        resumed = run(small_corpus, out, resume=True)
    assert resumed.training_args["steps"] == 12
    # From step 4 on with the full run's 12-step schedule: as if never interrupted.
    assert_same_params(params(resumed), uninterrupted[0])


def test_resume_refuses_changed_arguments_and_starts_fresh_without_checkpoints(
    small_corpus, tmp_path
):
    out = tmp_path / "run"
    run(small_corpus, out, max_steps=4)
    with pytest.raises(ValueError, match=r"lr: 0\.001 then, 0\.002 now"):
        run(small_corpus, out, max_steps=8, lr=2e-3, resume=True)
    with pytest.warns(UserWarning, match="no checkpoint"):
        run(small_corpus, tmp_path / "fresh", max_steps=2, warmup_steps=1, resume=True)


def test_packed_batches_give_the_padded_loss(small_corpus):
    # The CUDA layout (packed, cu_seqlens) runs here through the CPU stand-in of varlen
    # attention: same masks, labels in the same order, same loss.
    vocab, adata = small_corpus
    model = tiny_model(vocab).eval()
    source = PaddedTokens(
        adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"], "cells"
    )
    cells = np.arange(0, 60, 3)
    losses = []
    for packed in (False, True):
        micro = _prepare(
            source, cells, GeneMasker(vocab), batch_generator(5), torch.device("cpu"), packed
        )
        assert micro.n_masked == micro.labels.numel() > 0
        with torch.no_grad():
            losses.append(F.cross_entropy(model(**micro.inputs), micro.labels))
    assert "cu_seqlens" in micro.inputs
    torch.testing.assert_close(losses[0], losses[1])


def test_masked_gene_loss_equals_transformers_on_the_same_masked_batch(small_corpus, tmp_path):
    vocab, adata = small_corpus
    model = tiny_model(vocab).eval()
    model.save(tmp_path / "model")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "model").eval()
    source = PaddedTokens(
        adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"], "cells"
    )
    micro = _prepare(
        source, np.arange(24), GeneMasker(vocab), batch_generator(7), torch.device("cpu"), False
    )
    ids, positions = micro.inputs["input_ids"], micro.inputs["mlm_positions"]
    labels = torch.full_like(ids, -100)  # transformers ignores -100: every unmasked position
    labels[positions] = micro.labels
    with torch.no_grad():
        ours = F.cross_entropy(model(**micro.inputs), micro.labels)
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
    assert micro.n_masked > 20
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- data sources


def counts_corpus(folder, n_files=2, n_cells=80):
    paths = []
    for i in range(n_files):
        adata = sgf.datasets.synthetic_states(n_cells=n_cells, n_genes=120, random_state=i)
        adata.write_h5ad(folder / f"part{i}.h5ad")
        paths.append(folder / f"part{i}.h5ad")
    return paths


def test_h5ad_paths_go_through_a_token_store_that_resume_reuses(tmp_path):
    paths = counts_corpus(tmp_path)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    out = tmp_path / "run"
    model = pretrain(paths, tiny_model(vocab), output_dir=out, **{**QUICK, "max_steps": 4})
    manifest = out / "token_store" / "manifest.json"
    built = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["n_cells"] == 160
    assert model.training_args["n_train_cells"] + model.training_args["n_eval_cells"] == 160
    pretrain(
        paths,
        tiny_model(vocab),
        output_dir=out,
        resume=True,
        **{**QUICK, "max_steps": 6, "keep_last": 1},
    )
    assert manifest.stat().st_mtime_ns == built  # reused, not rebuilt
    assert [s for s, _ in list_checkpoints(out)] == [6]
    # The store folder itself is a data source too.
    pretrain(
        out / "token_store",
        tiny_model(vocab),
        output_dir=tmp_path / "again",
        max_steps=2,
        warmup_steps=1,
        token_budget=256,
    )
    # Changed files cannot be resumed on.
    sgf.datasets.synthetic_states(n_cells=30, n_genes=120, random_state=9).write_h5ad(paths[1])
    with pytest.raises(ValueError, match="a resumed run must see the data it started with"):
        pretrain(paths, tiny_model(vocab), output_dir=out, resume=True, **{**QUICK, "max_steps": 8})


def test_geneformer_arrow_dataset_as_data(tmp_path):
    vocab = module_vocab()
    cells = random_cells(60)
    folder = write_arrow_dataset(tmp_path / "ds", cells)
    model = pretrain(
        folder,
        tiny_model(vocab),
        output_dir=tmp_path / "run",
        max_steps=3,
        warmup_steps=1,
        token_budget=256,
    )
    assert model.training_args["n_train_cells"] + model.training_args["n_eval_cells"] == 60
    small = module_vocab(n_modules=2, module_size=10)  # ids only up to 23
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        pretrain(folder, tiny_model(small), output_dir=tmp_path / "bad", max_steps=3)


# ---------------------------------------------------------------------- bad input


def test_empty_and_gene_poor_corpora(tmp_path):
    vocab = module_vocab()
    model = tiny_model(vocab)
    with pytest.raises(ValueError, match="empty"):
        pretrain(ad.AnnData(np.zeros((0, 3))), model, output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="empty"):
        pretrain([], model, output_dir=tmp_path / "b")
    c, e = vocab.cls_id, vocab.eos_id
    poor = tokens_adata(vocab, [[c, 5, e], [c, 6, e], []])
    with pytest.raises(ValueError, match="two or more gene tokens"):
        pretrain(poor, model, output_dir=tmp_path / "c")
    mixed = tokens_adata(vocab, [[c, 5, e]] * 3 + [[c, *range(4, 20), e]] * 40)
    with pytest.warns(UserWarning, match="3 of 43 cells have fewer than two gene tokens"):
        trained = pretrain(
            mixed, model, output_dir=tmp_path / "d", max_steps=2, warmup_steps=1, token_budget=256
        )
    assert trained.training_args["n_train_cells"] + trained.training_args["n_eval_cells"] == 40


def test_other_vocabularies_are_refused_naming_both(tmp_path):
    vocab = module_vocab()
    other = module_vocab(name="other-modules")
    other = sgf.Vocabulary(
        other.token_dict,
        dict.fromkeys(other.genes, 2.0),
        special_tokens=V2_SPECIAL,
        name="other-modules",
        max_length=64,
    )
    adata = module_corpus(other, 50)
    with pytest.raises(ValueError, match=r"'other-modules'.*'modules'"):
        pretrain(adata, tiny_model(vocab), output_dir=tmp_path / "a")

    paths = counts_corpus(tmp_path, n_files=2, n_cells=40)
    va = sgf.Vocabulary.build(paths[:1], name="vocab-a", max_length=64)
    vb = sgf.Vocabulary.build(paths[1:], name="vocab-b", max_length=64)
    build_token_store(paths[:1], va, tmp_path / "store_a")
    build_token_store(paths[1:], vb, tmp_path / "store_b")
    with pytest.raises(ValueError, match=r"store_a.*'vocab-a'.*store_b.*'vocab-b'"):
        pretrain(
            [tmp_path / "store_a", tmp_path / "store_b"], tiny_model(va), output_dir=tmp_path / "b"
        )
    with pytest.raises(ValueError, match=r"'vocab-b'.*'vocab-a'"):
        pretrain(tmp_path / "store_b", tiny_model(va), output_dir=tmp_path / "c")


def test_unwritable_output_dir_is_refused_before_anything_runs(tmp_path, small_corpus):
    vocab, adata = small_corpus
    (tmp_path / "a_file").write_text("not a folder")
    model = tiny_model(vocab)
    before = params(model)
    paths = counts_corpus(tmp_path, n_files=1, n_cells=20)
    for data in (adata, paths):
        with pytest.raises(PermissionError, match="not a writable folder"):
            pretrain(data, model, output_dir=tmp_path / "a_file" / "run", max_steps=2)
    assert_same_params(params(model), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "part0.h5ad"]


def test_argument_checks(small_corpus, tmp_path):
    vocab, adata = small_corpus
    model = tiny_model(vocab)
    for bad in ({"eval_fraction": 1.0}, {"lr": 0}, {"save_every": 0}, {"mask_fraction": 0}):
        ((name, value),) = bad.items()
        with pytest.raises(ValueError, match=rf"{name} must .*got {value}\b"):
            pretrain(adata, model, output_dir=tmp_path, **bad)
    headless = tiny_model(vocab)
    headless.cls = None
    with pytest.raises(ValueError, match="no MLM head"):
        pretrain(adata, headless, output_dir=tmp_path)
    with pytest.warns(UserWarning, match="never reaches lr"):
        pretrain(adata, model, output_dir=tmp_path / "w", max_steps=2, token_budget=256)
    with pytest.raises(ValueError, match="fewer than the 1000 one step needs"):
        pretrain(
            adata, model, output_dir=tmp_path / "x", max_steps=2, gradient_accumulation_steps=1000
        )


# ---------------------------------------------------------------------- command line


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_pretrain_command_from_a_config_file(tmp_path, fmt, capsys):
    paths = counts_corpus(tmp_path, n_files=1, n_cells=60)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    vocab.save(tmp_path / "vocab.json")
    config = {
        "data": [paths[0].name],
        "output_dir": "run",
        "n_jobs": 1,
        "model": {
            "preset": "V1-10M",
            "vocabulary": "vocab.json",
            "overrides": TINY,
            "random_state": 0,
        },
        "training": {"max_steps": 3, "warmup_steps": 1, "token_budget": 256, "save_every": 2},
    }
    path = tmp_path / f"run.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(config))
    else:
        overrides = ", ".join(f"{k} = {v}" for k, v in TINY.items())
        path.write_text(
            f'data = ["{paths[0].name}"]\noutput_dir = "run"\nn_jobs = 1\n\n[model]\n'
            f'preset = "V1-10M"\nvocabulary = "vocab.json"\nrandom_state = 0\n'
            f"overrides = {{ {overrides} }}\n\n[training]\nmax_steps = 3\nwarmup_steps = 1\n"
            "token_budget = 256\nsave_every = 2\n"
        )
    assert pretrain_main([str(path)]) == 0
    assert "3 steps" in capsys.readouterr().out
    model = sgf.Geneformer.from_pretrained(tmp_path / "run")
    assert model.training_args["steps"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert pretrain_main([str(path), "--resume"]) == 0  # finished: nothing more to do

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config, "training": {"max_step": 3}}))
    capsys.readouterr()
    assert pretrain_main([str(bad)]) == 2  # a user's mistake: one line, no traceback
    err = capsys.readouterr().err
    assert re.match(r"error: Unknown key\(s\) \['max_step'\] in \[training\]", err)
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['max_step'\] in \[training\]"):
        pretrain_main([str(bad), "--debug"])
