"""Shared fixtures: the official dictionaries and data sets in ../shared, and small vocabularies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import scgeneformer as sgf

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REF = SHARED / "geneformer_ref"
DATA = SHARED / "data"


def shared_file(*parts: str) -> Path:
    """Path under ../shared, skipping the test with a reason when it is absent.

    Under CI (``CI=true`` in the environment) an absent file fails the test instead: there the
    data is provisioned, and a skip would hide that the real-data checks did not run.
    """
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent: this test needs the ../shared folder beside the project"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: real-data tests must run, not skip)")
        pytest.skip(reason)
    return path


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_single_threaded():
    # `make test` runs two pytest workers on two cores: more threads per worker only contend.
    import torch

    sgf.settings.progress = False
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def vocab_v1() -> sgf.Vocabulary:
    return sgf.Vocabulary.from_geneformer(
        shared_file("geneformer_ref", "token_dictionary_gc30M.pkl"),
        shared_file("geneformer_ref", "gene_median_dictionary_gc30M.pkl"),
    )


@pytest.fixture(scope="session")
def vocab_v2() -> sgf.Vocabulary:
    return sgf.Vocabulary.from_geneformer(
        shared_file("geneformer_ref", "token_dictionary_gc95M.pkl"),
        shared_file("geneformer_ref", "gene_median_dictionary_gc95M.pkl"),
        shared_file("geneformer_ref", "ensembl_mapping_dict_gc95M.pkl"),
    )


@pytest.fixture(scope="session")
def pbmc3k():
    import anndata as ad

    return ad.read_h5ad(shared_file("data", "pbmc3k", "pbmc3k_labelled_counts.h5ad"))


def small_vocab(n_genes: int = 40, *, cls: bool = True, seed: int = 0, **kwargs) -> sgf.Vocabulary:
    """A vocabulary over genes ENSG00000000001.. with random positive medians."""
    rng = np.random.default_rng(seed)
    special = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} if cls else None
    first = 4 if cls else 2
    genes = [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]
    medians = rng.lognormal(0.0, 1.0, n_genes)
    return sgf.Vocabulary(
        {g: first + i for i, g in enumerate(genes)},
        dict(zip(genes, medians, strict=True)),
        special_tokens=special,
        **kwargs,
    )
