"""The model argument of the tools: an encoder, or a classifier whose encoder is used.

A screen toward a goal state measures how the model's embedding of the state moves; only an
encoder fine-tuned to tell those states apart embeds them as different places (on Kang 2018 a
masked-gene pretrained model ranks the interferon genes last). So screens say when the model
they get was never fine-tuned on the states they compare.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..model import Geneformer, GeneformerClassifier, MultitaskClassifier


def encoder_of(model: Geneformer | GeneformerClassifier, what: str = "model") -> Geneformer:
    """Return the encoder a tool runs: ``model`` itself, or a classifier's encoder.

    Examples
    --------
    >>> encoder_of(clf) is clf.encoder  # doctest: +SKIP
    True
    """
    if isinstance(model, GeneformerClassifier):
        return model.encoder
    if isinstance(model, Geneformer):
        return model
    raise TypeError(
        f"{what} must be a sgf.Geneformer or a sgf.GeneformerClassifier, got "
        f"{type(model).__name__}."
    )


def warn_if_not_finetuned_on(
    model: Geneformer | GeneformerClassifier, state_key: str, states: Sequence[str]
) -> None:
    """Warn when a state screen runs on a model that was not fine-tuned on those states.

    A classifier passes when it was trained on ``state_key`` (one of its columns, for a
    multitask one) or knows every state as a class of one of them.
    A plain encoder passes only when it has no masked-gene head (the encoder of a fine-tuned
    classifier, or a fine-tuned folder loaded as an encoder); with the head it is a
    pretrained model, which was never shown the states.
    """
    if isinstance(model, GeneformerClassifier):
        multitask = isinstance(model, MultitaskClassifier)
        tasks = model.tasks if multitask else {model.label_key: model.classes}
        if state_key in tasks or any(set(states) <= set(c) for c in tasks.values()):
            return
        trained = "; ".join(f"{k or 'labels'!r} ({', '.join(c[:5])})" for k, c in tasks.items())
        problem = f"the classifier was fine-tuned on {trained}, not on obs[{state_key!r}]"
    elif model.has_mlm_head:
        problem = "the model is a pretrained encoder, never fine-tuned on these states"
    else:
        return
    warnings.warn(
        f"Screening toward {states[-1]!r} of obs[{state_key!r}], but {problem}. Its embedding "
        "need not separate the states, and the ranking may miss the genes that drive them "
        f"(on Kang 2018 a pretrained-only model ranks the interferon genes last). Fine-tune "
        f"first, clf = sgf.tl.finetune(adata, model, label_key={state_key!r}), and screen "
        "with clf.",
        UserWarning,
        stacklevel=4,
    )
