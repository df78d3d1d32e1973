"""Models and dictionaries by hub repository id, offline, from a hand-made hub cache."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

import scgeneformer as sgf
from scgeneformer import _hub

pytest.importorskip("huggingface_hub")

REPO = "someone/Geneformer"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)


def hub_cache(tmp_path):
    """The layout huggingface_hub keeps: refs/<revision> -> snapshots/<commit>/<files>."""
    genes = [f"ENSG{i:011d}" for i in range(40)]
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    tokens |= {g: i + 4 for i, g in enumerate(genes)}
    medians = {g: 1.0 + i / 10 for i, g in enumerate(genes)}
    symbols = {f"GENE{i}": g for i, g in enumerate(genes)}
    repo = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "geneformer").mkdir(parents=True)
    for name, table in (
        ("token_dictionary_gc104M.pkl", tokens),
        ("gene_median_dictionary_gc104M.pkl", medians),
        ("gene_name_id_dict_gc104M.pkl", symbols),
    ):
        (snapshot / "geneformer" / name).write_bytes(pickle.dumps(table))
    (repo / "refs").mkdir()
    for ref in ("main", "v2.0"):
        (repo / "refs" / ref).write_text(COMMIT)
    local = snapshot / "geneformer"
    vocab = sgf.Vocabulary.from_geneformer(
        local / "token_dictionary_gc104M.pkl",
        local / "gene_median_dictionary_gc104M.pkl",
        local / "gene_name_id_dict_gc104M.pkl",
    )
    model = sgf.Geneformer.from_config("V2-104M", vocab, random_state=0, **TINY)
    model.save(tmp_path / "saved")
    (snapshot / "Geneformer-V2-104M").mkdir()
    for name in ("config.json", "model.safetensors"):  # the official folders hold no vocab
        shutil.copy(tmp_path / "saved" / name, snapshot / "Geneformer-V2-104M" / name)
    return tmp_path / "cache", vocab, model


def test_model_and_dictionaries_from_an_offline_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache, vocab, model = hub_cache(tmp_path)
    options = dict(cache_dir=cache, local_files_only=True)
    names = ["token_dictionary_gc104M.pkl", "gene_median_dictionary_gc104M.pkl"]
    loaded_vocab = sgf.Vocabulary.from_geneformer(
        *names, "gene_name_id_dict_gc104M.pkl", repo_id=REPO, subfolder="geneformer", **options
    )
    assert loaded_vocab == vocab
    assert loaded_vocab.tokens_for(["GENE3"]).tolist() == [7]  # the symbol mapping came too

    for revision in (None, "v2.0", COMMIT):
        loaded = sgf.Geneformer.from_pretrained(
            REPO, vocab, subfolder="Geneformer-V2-104M", revision=revision, **options
        )
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    with pytest.raises(OSError, match=r"someone/Other.*hub or its cache"):
        sgf.Geneformer.from_pretrained("someone/Other", vocab, subfolder="x", **options)
    with pytest.raises(OSError, match=r"no_such\.pkl"):
        sgf.Vocabulary.from_geneformer(
            "no_such.pkl", names[1], repo_id=REPO, subfolder="geneformer", **options
        )
    with pytest.raises(FileNotFoundError, match="no folder 'Geneformer-V9'"):
        sgf.Geneformer.from_pretrained(REPO, vocab, subfolder="Geneformer-V9", **options)


def test_local_paths_never_go_to_the_hub(tmp_path, monkeypatch):
    _, vocab, _ = hub_cache(tmp_path)

    def no_hub():
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(_hub, "_hub", no_hub)
    assert not _hub.is_repo_id(tmp_path / "saved")
    assert sgf.Geneformer.from_pretrained(tmp_path / "saved").vocab == vocab
    assert sgf.Geneformer.from_pretrained(tmp_path, subfolder="saved").vocab == vocab
    monkeypatch.chdir(tmp_path)
    assert not _hub.is_repo_id("cache/models--someone--Geneformer")  # exists here: a path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sgf.Geneformer.from_pretrained("runs/missing/model")  # three parts: not a repo id
