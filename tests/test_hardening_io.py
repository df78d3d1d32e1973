"""Issue 12 (load side, run folders, tokens): bad ids, bad weights, shared folders, kills.

Every test feeds a fault a user meets on a cluster (edited tokens, damaged or mixed model
folders, two jobs in one folder, reordered data, read-only places, a full disk) and asserts
the clear error, or that the work survives.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

import scgeneformer as sgf
from scgeneformer import _atomic
from scgeneformer.data._sources import read_arrow_dataset
from scgeneformer.data._store import TokenStore
from scgeneformer.data._store_build import build_token_store
from scgeneformer.model import _hf_folder
from scgeneformer.model._classifier import GeneformerClassifier
from scgeneformer.tl import pretrain
from scgeneformer.train import _run_lock
from scgeneformer.train._checkpoints import list_checkpoints
from scgeneformer.train._pretrain_loop import PretrainRun

from .conftest import small_vocab
from .test_pretrain import (
    assert_same_params,
    counts_corpus,
    module_corpus,
    module_vocab,
    params,
    tiny_model,
    tokens_adata,
)
from .test_token_store import random_cells, write_arrow_dataset

SHORT = {"max_steps": 4, "warmup_steps": 1, "token_budget": 256, "save_every": 2}


@pytest.fixture(scope="module")
def corpus():
    vocab = module_vocab()
    return vocab, module_corpus(vocab, 120, seed=3)


def quick_run(corpus, out, **kwargs):
    vocab, adata = corpus
    return pretrain(adata, tiny_model(vocab), output_dir=out, **{**SHORT, **kwargs})


def saved_model(folder, vocab=None, seed=0):
    vocab = vocab or small_vocab(30, max_length=48)
    model = sgf.Geneformer.from_config(
        "V1-10M",
        vocab,
        random_state=seed,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=48,
    )
    model.save(folder)
    return model


# ---------------------------------------------------------------------- 1: token ids


def test_out_of_range_and_negative_ids_in_anndata_are_refused_before_pretraining(tmp_path):
    vocab = module_vocab()
    model = tiny_model(vocab)
    before = params(model)
    c, e = vocab.cls_id, vocab.eos_id
    rows = [[c, *range(4, 20), e]] * 30 + [[c, 5, 999, 7, e]]
    with pytest.raises(
        ValueError,
        match=r"outside the model's vocabulary 'modules' \(0\.\.63\) in "
        r"adata\.obsm\['geneformer_tokens'\], e\.g\. \[999\]",
    ):
        pretrain(tokens_adata(vocab, rows), model, output_dir=tmp_path / "a", **SHORT)
    negative = tokens_adata(vocab, [[c, *range(4, 20), e]] * 30)
    negative.obsm["geneformer_tokens"] = negative.obsm["geneformer_tokens"].astype(np.int64)
    negative.obsm["geneformer_tokens"][3, 5] = -4
    with pytest.raises(ValueError, match=r"outside the model's vocabulary .*e\.g\. \[-4\]"):
        pretrain(negative, model, output_dir=tmp_path / "b", **SHORT)
    assert_same_params(params(model), before)
    assert not list_checkpoints(tmp_path / "a") and not list_checkpoints(tmp_path / "b")


@pytest.mark.filterwarnings("ignore:Screening toward:UserWarning")
def test_out_of_range_ids_are_refused_by_both_screens():
    adata = sgf.datasets.synthetic_states(n_cells=40, n_genes=120, random_state=0)
    vocab = sgf.Vocabulary.build(adata, max_length=64)
    model = sgf.Geneformer.from_config(
        "V1-10M", vocab, random_state=0, num_hidden_layers=1, max_position_embeddings=64
    )
    sgf.pp.rank_tokenize(adata, vocab)
    adata.obsm["geneformer_tokens"] = adata.obsm["geneformer_tokens"].astype(np.int32)
    # In a start-state cell: those are embedded unchecked (the goal cells, checked, come first
    # only for the other state).
    first_disease = int(np.flatnonzero(adata.obs["state"] == "disease")[0])
    adata.obsm["geneformer_tokens"][first_disease, 1] = len(vocab) + 5
    screen = {"state_key": "state", "start_state": "disease", "goal_state": "healthy"}
    for tool in (sgf.tl.in_silico_delete, sgf.tl.in_silico_overexpress):
        with pytest.raises(
            ValueError, match=rf"outside the model's vocabulary .*\[{len(vocab) + 5}\]"
        ):
            tool(adata, model, **screen)
    assert "in_silico_delete_shift" not in adata.var


def test_edited_token_store_is_refused_naming_the_store(tmp_path):
    paths = counts_corpus(tmp_path, n_files=1, n_cells=40)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    store = build_token_store(paths, vocab, tmp_path / "store")
    tokens_bin = tmp_path / "store" / "shard-00000" / "tokens.bin"
    flat = np.fromfile(tokens_bin, dtype=store.manifest["token_dtype"])
    flat[10] = 60_000
    flat.tofile(tokens_bin)
    with pytest.raises(
        ValueError, match=r"outside the model's vocabulary .* in token store .*store'.*\[60000\]"
    ):
        pretrain(tmp_path / "store", tiny_model(vocab), output_dir=tmp_path / "run", **SHORT)


def test_negative_ids_in_an_arrow_dataset_are_refused(tmp_path):
    cells = random_cells(30)
    cells[7] = np.array([2, 5, -3, 9, 3])
    folder = write_arrow_dataset(tmp_path / "ds", cells)
    with pytest.raises(
        ValueError, match=r"outside the model's vocabulary .*arrow data set.*\[-3\]"
    ):
        pretrain(folder, tiny_model(module_vocab()), output_dir=tmp_path / "run", **SHORT)


def test_ids_are_checked_once_on_the_cpu_not_per_step(corpus, tmp_path, monkeypatch):
    calls = []
    original = sgf.Vocabulary.check_tokens

    def counted(self, tokens, *, where=None):
        calls.append(type(tokens).__name__)
        return original(self, tokens, where=where)

    monkeypatch.setattr(sgf.Vocabulary, "check_tokens", counted)
    quick_run(corpus, tmp_path / "run")
    # Once when the slots are read, once in the scan that also hashes them; never a tensor.
    assert calls == ["ndarray", "ndarray"]


# ---------------------------------------------------------------------- 2 and 5: weights


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    model = saved_model(tmp_path / "ok")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
        model.bert.embeddings.LayerNorm.bias[1] = float("inf")
    model.save(tmp_path / "nan")
    with pytest.raises(
        ValueError,
        match=r"holds NaN or inf in bert\.embeddings\.LayerNorm\.bias, "
        r"bert\.encoder\.layer\.0\.attention\.self\.query\.weight",
    ):
        sgf.Geneformer.from_pretrained(tmp_path / "nan")


def test_classifier_with_a_non_finite_head_is_refused(tmp_path):
    encoder = saved_model(tmp_path / "enc")
    clf = GeneformerClassifier.from_encoder(encoder, ["a", "b"], random_state=0)
    with torch.no_grad():
        clf.classifier.weight[1, 3] = float("nan")
    clf.save(tmp_path / "clf")
    with pytest.raises(ValueError, match=r"NaN or inf in classifier\.weight"):
        GeneformerClassifier.from_pretrained(tmp_path / "clf")


def test_weights_sha256_is_recorded_and_a_changed_byte_is_refused(tmp_path):
    folder = tmp_path / "model"
    saved_model(folder)
    meta = json.loads((folder / "scgeneformer.json").read_text())
    assert meta["weights_file"] == "model.safetensors"
    assert meta["weights_sha256"] == _hf_folder.file_sha256(folder / "model.safetensors")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0x10  # one flipped bit in the last tensor: still a valid safetensors file
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors' does not match the sha256 recorded"):
        sgf.Geneformer.from_pretrained(folder)


def test_a_save_killed_between_weights_and_metadata_is_detected(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    vocab = small_vocab(30, max_length=48)
    old = saved_model(folder, vocab, seed=0)
    new = sgf.Geneformer.from_config(
        "V1-10M",
        vocab,
        random_state=1,
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=48,
    )
    real_replace = os.replace

    def killed_before_metadata(src, dst):
        if str(dst).endswith("scgeneformer.json"):
            raise KeyboardInterrupt  # the job's time ran out here
        real_replace(src, dst)

    monkeypatch.setattr(_hf_folder.os, "replace", killed_before_metadata)
    with pytest.raises(KeyboardInterrupt):
        new.save(folder)
    monkeypatch.undo()
    assert load_file(folder / "model.safetensors").keys()  # the new weights are in place
    with pytest.raises(ValueError, match="weights of one save beside the metadata of another"):
        sgf.Geneformer.from_pretrained(folder)
    # Saving again makes the folder whole, and no staging folder is left behind.
    new.save(folder)
    again = sgf.Geneformer.from_pretrained(folder)
    assert_same_params(params(again), params(new))
    assert not torch.equal(
        params(again)["bert.embeddings.word_embeddings.weight"],
        params(old)["bert.embeddings.word_embeddings.weight"],
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(_hf_folder.MODEL_FILES)


# ---------------------------------------------------------------------- 3: one writer


def test_a_second_run_into_a_busy_output_dir_is_refused_naming_the_holder(
    corpus, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    original = PretrainRun._step
    refused = []

    def second_run_at_step_1(self, *args):
        if self.step == 1 and not refused:
            with pytest.raises(
                _run_lock.RunFolderInUse,
                match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()},",
            ):
                quick_run(corpus, out)
            refused.append(True)
        return original(self, *args)

    monkeypatch.setattr(PretrainRun, "_step", second_run_at_step_1)
    model = quick_run(corpus, out)
    assert refused and model.training_args["steps"] == 4
    # The holder is gone: the folder is free again, and the lock file names nobody.
    assert (out / _run_lock.LOCK_NAME).read_text() == ""
    quick_run(corpus, out, resume=True)


LOCK_HOLDER = """
import sys, time
from scgeneformer.train._run_lock import lock_run_folder
lock = lock_run_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_in_another_process_holds_the_folder(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(_run_lock.RunFolderInUse, match=rf"pid {holder.pid},"):
            quick_run(corpus, out)
        assert not list_checkpoints(out)
    finally:
        holder.kill()
        holder.wait()
    # Killed (SIGKILL) without releasing: the kernel dropped its lock, the file still names it.
    assert f'"pid": {holder.pid}' in (out / _run_lock.LOCK_NAME).read_text()
    with pytest.warns(
        UserWarning, match=rf"ended without releasing it \(host .*, pid {holder.pid}"
    ):
        quick_run(corpus, out)


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_without_flock_the_named_holder_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK, as some network mounts answer

    monkeypatch.setattr(_run_lock.fcntl, "flock", no_flock)
    folder = tmp_path / "run"
    folder.mkdir()
    lock_file = folder / _run_lock.LOCK_NAME
    here = socket.gethostname()
    lock_file.write_text(json.dumps({"host": here, "pid": os.getppid(), "started": "then"}))
    with pytest.raises(_run_lock.RunFolderInUse, match=rf"pid {os.getppid()}.*delete"):
        _run_lock.lock_run_folder(folder)
    lock_file.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "then"}))
    with pytest.raises(
        _run_lock.RunFolderInUse, match=r"host node-17, pid 4242.*cannot be checked"
    ):
        _run_lock.lock_run_folder(folder)
    dead = _dead_pid()
    lock_file.write_text(json.dumps({"host": here, "pid": dead, "started": "then"}))
    with pytest.warns(UserWarning, match=rf"pid {dead}.*taking the lock over"):
        lock = _run_lock.lock_run_folder(folder)
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert lock_file.read_text() == ""


# ---------------------------------------------------------------------- 4: resume fingerprint


def test_resume_on_reordered_cells_is_refused(corpus, tmp_path):
    vocab, adata = corpus
    out = tmp_path / "run"
    quick_run(corpus, out, max_steps=2)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    reordered = adata[order].copy()
    assert reordered.obs["geneformer_n_tokens"].sum() == adata.obs["geneformer_n_tokens"].sum()
    with pytest.raises(ValueError, match=r"differs in the tokens \(the same cell and token counts"):
        pretrain(reordered, tiny_model(vocab), output_dir=out, resume=True, **SHORT)
    # The same cells resume.
    assert quick_run(corpus, out, resume=True).training_args["steps"] == 4


def test_the_token_hash_is_the_same_for_an_anndata_and_a_store_of_its_cells(tmp_path):
    paths = counts_corpus(tmp_path, n_files=1, n_cells=30)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    store = build_token_store(paths, vocab, tmp_path / "store")
    adata = ad.read_h5ad(paths[0])
    sgf.pp.rank_tokenize(adata, vocab)
    from scgeneformer.data._sources import PaddedTokens

    padded = PaddedTokens(
        adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"], "cells"
    )
    assert padded.scan(vocab) == store.scan(vocab)
    shuffled = PaddedTokens(
        adata.obsm["geneformer_tokens"][::-1], adata.obs["geneformer_n_tokens"][::-1], "cells"
    )
    assert shuffled.scan(vocab) != store.scan(vocab)


# ---------------------------------------------------------------------- 12: layer, gene_key


def layered_corpus(folder, n_files=2, n_cells=60):
    """h5ad files as many arrive: log-normalised X, counts in a layer, symbols as var_names."""
    paths = []
    for i in range(n_files):
        adata = sgf.datasets.synthetic_states(n_cells=n_cells, n_genes=120, random_state=i)
        adata.layers["counts"] = adata.X.copy()
        normalised = sp.csr_matrix(adata.X, dtype=np.float32)
        normalised.data = np.log1p(normalised.data).astype(np.float32)
        adata.X = normalised
        adata.var["ensembl"] = adata.var_names
        adata.var_names = adata.var["gene_symbol"].astype(str)
        paths.append(folder / f"part{i}.h5ad")
        adata.write_h5ad(paths[-1])
    return paths


def test_pretrain_on_h5ad_paths_takes_layer_and_gene_key(tmp_path):
    paths = layered_corpus(tmp_path)
    vocab = sgf.Vocabulary.build(paths, layer="counts", gene_key="ensembl", max_length=64)
    with pytest.raises(ValueError, match="pass layer="):
        pretrain(paths, tiny_model(vocab), output_dir=tmp_path / "bad", gene_key="ensembl", **SHORT)
    model = pretrain(
        paths,
        tiny_model(vocab),
        output_dir=tmp_path / "run",
        layer="counts",
        gene_key="ensembl",
        **SHORT,
    )
    assert model.training_args["n_train_cells"] + model.training_args["n_eval_cells"] == 120
    manifest = json.loads((tmp_path / "run" / "token_store" / "manifest.json").read_text())
    assert (manifest["layer"], manifest["gene_key"]) == ("counts", "ensembl")


def test_pretrain_command_takes_layer_and_gene_key_from_config_and_options(tmp_path, capsys):
    from scgeneformer.pretrain_cli import main as pretrain_main

    paths = layered_corpus(tmp_path, n_files=1)
    vocab = sgf.Vocabulary.build(paths, layer="counts", gene_key="ensembl", max_length=64)
    vocab.save(tmp_path / "vocab.json")
    config = {
        "data": [paths[0].name],
        "output_dir": "run",
        "model": {
            "preset": "V1-10M",
            "vocabulary": "vocab.json",
            "overrides": {"num_hidden_layers": 1, "max_position_embeddings": 64},
        },
        "training": {**SHORT, "layer": "counts"},
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    assert pretrain_main([str(tmp_path / "run.json"), "--gene-key", "ensembl"]) == 0
    assert "4 steps" in capsys.readouterr().out


# ---------------------------------------------------------------------- 13: places to write


def test_a_read_only_parent_does_not_stop_the_final_save(corpus, tmp_path, monkeypatch):
    # As root, chmod does not stop writes; so the parent refuses them through the one call
    # that writes beside a folder (a staging folder), as a read-only mount would.
    parent = tmp_path / "shared_readonly"
    out = parent / "run"
    out.mkdir(parents=True)
    real_mkdtemp = _atomic.tempfile.mkdtemp

    def read_only_parent(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, parent):
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(_atomic.tempfile, "mkdtemp", read_only_parent)
    model = quick_run(corpus, out)
    monkeypatch.undo()
    assert (
        sgf.Geneformer.from_pretrained(out).training_args["steps"] == model.training_args["steps"]
    )
    assert sorted(p.name for p in parent.iterdir()) == ["run"]


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoints go")
    vocab, adata = corpus
    model = tiny_model(vocab)
    before = params(model)
    with pytest.raises(
        PermissionError, match=r"The checkpoint folder .*checkpoints' is not a writable folder"
    ):
        pretrain(adata, model, output_dir=out, **SHORT)
    assert_same_params(params(model), before)
    assert (out / _run_lock.LOCK_NAME).read_text() == ""  # released on the way out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="checkpoints' is not a writable folder"):
            quick_run(corpus, out)
    finally:
        (out / "checkpoints").chmod(0o755)


# ---------------------------------------------------------------------- 14: umask


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def modes(folder):
    """Permission bits of a folder and everything below it, by kind."""
    found = {"dirs": {stat.S_IMODE(folder.stat().st_mode)}, "files": set()}
    for path in folder.rglob("*"):
        found["dirs" if path.is_dir() else "files"].add(stat.S_IMODE(path.stat().st_mode))
    return found


def test_saved_folders_honour_the_umask(corpus, tmp_path, umask_022):
    run = tmp_path / "run"
    quick_run(corpus, run)
    assert modes(run) == {"dirs": {0o755}, "files": {0o644}}
    model = sgf.Geneformer.from_pretrained(run)
    model.save(tmp_path / "copy")
    clf = GeneformerClassifier.from_encoder(model, ["a", "b"], random_state=0)
    clf.save(tmp_path / "clf")
    paths = counts_corpus(tmp_path, n_files=1, n_cells=20)
    build_token_store(paths, sgf.Vocabulary.build(paths, max_length=64), tmp_path / "store")
    for folder in ("copy", "clf", "store"):
        assert modes(tmp_path / folder) == {"dirs": {0o755}, "files": {0o644}}, folder
    os.umask(0o027)
    model.save(tmp_path / "private")
    assert modes(tmp_path / "private") == {"dirs": {0o750}, "files": {0o640}}


# ---------------------------------------------------------------------- more faults


def test_garbage_metadata_json_is_named(tmp_path):
    saved_model(tmp_path / "m")
    (tmp_path / "m" / "scgeneformer.json").write_text('{"format": "scgeneformer-model", ')
    with pytest.raises(ValueError, match=r"Metadata '.*scgeneformer\.json' is not readable JSON"):
        sgf.Geneformer.from_pretrained(tmp_path / "m")


def test_truncated_weights_with_recorded_sha_are_refused_as_damaged(tmp_path):
    saved_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy that stopped early
    with pytest.raises(ValueError, match=r"does not match the sha256 .*damaged"):
        sgf.Geneformer.from_pretrained(tmp_path / "m")


def test_metadata_naming_a_missing_weights_file_is_refused(tmp_path):
    model = saved_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    # An older export left a .bin beside it: it must not be taken for the weights described.
    torch.save(
        {f"bert.{k}": v for k, v in model.bert.state_dict().items()},
        tmp_path / "m" / "pytorch_model.bin",
    )
    with pytest.raises(
        FileNotFoundError, match=r"weights file 'model\.safetensors', which is missing"
    ):
        sgf.Geneformer.from_pretrained(tmp_path / "m")


@pytest.fixture
def small_store(tmp_path):
    paths = counts_corpus(tmp_path, n_files=2, n_cells=30)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    return vocab, build_token_store(paths, vocab, tmp_path / "store").folder


def test_a_token_store_with_a_shard_missing_is_refused(small_store):
    _, folder = small_store
    import shutil

    shutil.rmtree(folder / "shard-00001")
    with pytest.raises(
        ValueError, match=r"shard-00001' is missing or unreadable.*Build the store again"
    ):
        TokenStore(folder)


def test_a_token_store_with_garbage_offsets_is_refused(small_store):
    _, folder = small_store
    offsets = np.load(folder / "shard-00000" / "offsets.npy")
    offsets[5] = offsets[6] + 3  # a cell of negative length after it
    np.save(folder / "shard-00000" / "offsets.npy", offsets)
    with pytest.raises(ValueError, match=r"does not match the manifest .*rising values"):
        TokenStore(folder)
    (folder / "shard-00000" / "offsets.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="missing or unreadable"):
        TokenStore(folder)


def test_a_store_whose_vocabulary_file_was_swapped_is_refused(small_store):
    _, folder = small_store
    small_vocab(20, name="someone-elses").save(folder / "vocab.json")
    store = TokenStore(folder)
    with pytest.raises(ValueError, match=r"holds vocabulary 'someone-elses' .*not the"):
        _ = store.vocabulary


def test_resume_with_another_architecture_is_refused_naming_it(corpus, tmp_path):
    vocab, adata = corpus
    out = tmp_path / "run"
    quick_run(corpus, out, max_steps=2)
    bigger = tiny_model(vocab, num_hidden_layers=3)
    with pytest.raises(
        ValueError,
        match=r"differs in the model's architecture \(num_hidden_layers: 2 then, 3 now\)",
    ):
        pretrain(adata, bigger, output_dir=out, resume=True, **SHORT)


def test_resume_with_a_model_of_another_vocabulary_of_the_same_size_is_refused(corpus, tmp_path):
    vocab, adata = corpus
    out = tmp_path / "run"
    quick_run(corpus, out, max_steps=2)
    other = sgf.Vocabulary(
        vocab.token_dict,
        dict.fromkeys(vocab.genes, 3.0),
        special_tokens=vocab.special_tokens,
        name="modules-v2",
        max_length=64,
    )
    relabelled = adata.copy()
    relabelled.uns["geneformer"] = {"vocabulary_sha256": other.sha256, "vocabulary_name": "x"}
    with pytest.raises(ValueError, match="differs in the model's vocabulary"):
        pretrain(relabelled, tiny_model(other), output_dir=out, resume=True, **SHORT)


def test_output_dir_that_is_a_file_is_refused(corpus, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(PermissionError, match=r"output_dir .*run' is not a writable folder"):
        quick_run(corpus, tmp_path / "run")


def test_a_folder_where_a_final_file_goes_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "run"
    (out / "model.safetensors").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=r"model\.safetensors' is a folder"):
        quick_run(corpus, out)
    assert not list_checkpoints(out)


def test_a_full_disk_during_the_final_save_loses_nothing(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = _hf_folder._write_folder_contents
    calls = []

    def full_at_the_final_save(folder, *args):
        calls.append(folder)
        if folder.parent == out:  # the final model stages inside output_dir
            (folder / "model.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        real_save(folder, *args)

    monkeypatch.setattr(_hf_folder, "_write_folder_contents", full_at_the_final_save)
    with pytest.raises(OSError, match="No space left"):
        quick_run(corpus, out)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert not (out / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".scgeneformer-save")]
    leftover = out / ".scgeneformer-save.tmp-killed"  # what a SIGKILL there would leave
    (leftover / "model.safetensors").parent.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    # Resuming the finished run writes the final model from the last checkpoint.
    resumed = quick_run(corpus, out, resume=True)
    assert not leftover.exists()
    loaded = sgf.Geneformer.from_pretrained(out)
    assert_same_params(params(loaded), {k: v.cpu() for k, v in params(resumed).items()})


def test_a_symlinked_output_dir_is_written_through(corpus, tmp_path):
    target = tmp_path / "scratch" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(target)
    quick_run(corpus, link)
    assert link.is_symlink()
    assert (target / "model.safetensors").is_file() and list_checkpoints(target)
    sgf.Geneformer.from_pretrained(link)


def test_float_tokens_with_nan_are_refused(corpus, tmp_path):
    vocab, adata = corpus
    bad = adata.copy()
    bad.obsm["geneformer_tokens"] = bad.obsm["geneformer_tokens"].astype(np.float32)
    bad.obsm["geneformer_tokens"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"geneformer_tokens'\] must be integers, got float32"):
        pretrain(bad, tiny_model(vocab), output_dir=tmp_path / "run", **SHORT)


def test_token_counts_that_disagree_with_the_rows_are_refused(corpus, tmp_path):
    vocab, adata = corpus
    bad = adata.copy()
    bad.obs["geneformer_n_tokens"] = bad.obs["geneformer_n_tokens"].to_numpy() - 1
    bad.obs.iloc[:5, bad.obs.columns.get_loc("geneformer_n_tokens")] += 1
    with pytest.raises(
        ValueError, match=r"disagrees with .*cell 5 has \d+ tokens in its row but a count of"
    ):
        pretrain(bad, tiny_model(vocab), output_dir=tmp_path / "run", **SHORT)


def test_a_bit_rotted_checkpoint_is_skipped_for_the_one_before(corpus, tmp_path):
    out = tmp_path / "run"
    quick_run(corpus, out)
    weights = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-00000004' is damaged .*does not match the sha256"):
        resumed = quick_run(corpus, out, resume=True)
    assert resumed.training_args["steps"] == 4  # steps 3-4 trained again from step 2


def test_an_arrow_dataset_read_is_unchanged_by_the_scan(tmp_path):
    cells = random_cells(20)
    source = read_arrow_dataset(write_arrow_dataset(tmp_path / "ds", cells))
    assert len(source.scan(module_vocab())) == 32


def test_metadata_pointing_the_weights_elsewhere_is_refused(tmp_path):
    saved_model(tmp_path / "m")
    meta_path = tmp_path / "m" / "scgeneformer.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_file"] = "../../somewhere/huge.bin"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"names the weights file '\.\./\.\./somewhere/huge\.bin'"):
        sgf.Geneformer.from_pretrained(tmp_path / "m")


def test_a_lock_file_that_cannot_be_opened_is_named(tmp_path):
    folder = tmp_path / "run"
    (folder / _run_lock.LOCK_NAME).mkdir(parents=True)  # as unopenable as another user's file
    with pytest.raises(
        PermissionError, match=r"Cannot open the run folder's lock file .*\.scgeneformer\.lock"
    ):
        _run_lock.lock_run_folder(folder)


def test_sparse_token_slots_are_refused_with_the_shape(corpus, tmp_path):
    vocab, adata = corpus
    bad = adata.copy()
    bad.obsm["geneformer_tokens"] = sp.csr_matrix(bad.obsm["geneformer_tokens"])
    with pytest.raises(ValueError, match=r"must be a \(cells, length\) matrix"):
        pretrain(bad, tiny_model(vocab), output_dir=tmp_path / "run", **SHORT)
