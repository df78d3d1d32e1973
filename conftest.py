"""Doctest namespace: the names the docstring examples of methods share with their class's."""

import dataclasses

import numpy as np
import pytest
import torch
from _pytest.doctest import DoctestItem

import scgeneformer as sgf
from scgeneformer.model._classifier import GeneformerClassifier


@pytest.fixture(autouse=True)
def _restore_settings():
    """Undo what an example or test changed in ``sgf.settings``."""
    saved = dataclasses.asdict(sgf.settings)
    yield
    for name, value in saved.items():
        setattr(sgf.settings, name, value)


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    """Give doctests a 50-gene vocabulary, a 2-layer V1 model and a classifier, as classes do."""
    if not isinstance(request.node, DoctestItem):
        return
    genes = [f"ENSG{i:011d}" for i in range(50)]
    vocab = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    doctest_namespace.update(
        np=np,
        torch=torch,
        sgf=sgf,
        vocab=vocab,
        model=model.eval(),
        clf=GeneformerClassifier.from_encoder(model, ["healthy", "disease"], random_state=0),
        ids=torch.tensor([[5, 9, 3, 0], [7, 2, 8, 11]]),
    )
