"""Parameter text shared by the tools, written once and spliced into their docstrings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

doc_adata_tokens = """\
adata
    Cells; tokens in ``obsm["geneformer_tokens"]`` or raw counts to make them from."""

doc_emb_layer = """\
emb_layer
    Which layer to read, as Geneformer's ``emb_layer``: -1 (default) the second-to-last
    layer, 0 the last, down to ``-num_layers`` (the embedding layer). The old name
    ``layer=`` still works, with a warning, until version 0.3."""

doc_pooling = """\
pooling
    ``"mean"``: average of the gene tokens (``<cls>`` and ``<eos>`` excluded);
    ``"cls"``: the ``<cls>`` token (V2-style vocabularies only)."""

doc_token_budget = """\
token_budget
    Tokens per batch (default ``sgf.settings.token_budget``); lower it if memory runs out.
    The old name ``batch_tokens=`` still works, with a warning, until version 0.3."""

doc_device_dtype = """\
device, dtype
    Default ``sgf.settings`` ("auto": CUDA when present, in bfloat16 on compute capability
    8.0+, float16 on 7.x; else CPU float32). The model is moved to ``device``. The execution
    plan that ran (attention path, the dtype that actually ran) goes into ``uns``."""

doc_copy = """\
copy
    Return a new AnnData instead of writing into ``adata``."""

doc_plot_output = """\
ax
    Axes to draw into; default a new figure.
show
    Show the figure; default: when nothing is saved and matplotlib is interactive.
save
    File to save the figure to."""


def doc_params(**fragments: str) -> Callable[[F], F]:
    """Replace ``{name}`` in a docstring by the fragment ``name``, indented to match.

    Examples
    --------
    >>> @doc_params(copy=doc_copy)
    ... def tool():
    ...     '''Do it.
    ...
    ...     Parameters
    ...     ----------
    ...     {copy}
    ...     '''
    >>> print(tool.__doc__.splitlines()[4].strip())
    copy
    """

    def decorate(func: F) -> F:
        doc = func.__doc__ or ""
        for name, text in fragments.items():
            placeholder = "{" + name + "}"
            if placeholder not in doc:
                raise ValueError(f"{func.__name__}'s docstring has no {placeholder}.")
            line = next(line for line in doc.splitlines() if line.strip() == placeholder)
            indent = line[: len(line) - len(line.lstrip())]
            doc = doc.replace(placeholder, text.replace("\n", "\n" + indent))
        func.__doc__ = doc
        return func

    return decorate
