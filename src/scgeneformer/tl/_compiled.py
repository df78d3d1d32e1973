"""Running the encoder for the tools: eager, or through ``torch.compile``.

With ``sgf.settings.compile`` on, the encoder's layers (``model.bert``) run through
``torch.compile(dynamic=True)``. Every size that changes from batch to batch (tokens, cells,
the longest cell, a padded batch's rows and width) stays symbolic, and the attention strategy
is rebuilt inside the compiled function from its tensors, so new batch shapes reuse the
compiled code instead of recompiling (tests/test_compiled.py counts the graphs over batches
of random shapes; on torch 2.4 and 2.13 no bucketing of shapes was needed for that).
Data-dependent work (masks, offsets, checks) stays outside the compiled region, and the
default mode never captures CUDA graphs, whose replays would reuse the offsets of the
captured batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import lru_cache

import torch

from .._plan import ExecutionPlan
from ..model import Geneformer
from ..model._attention import PackedAttention, PaddedAttention
from ..model._encoder import Bert


def _padded_layers(
    bert: Bert, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    return Bert.forward(bert, ids, positions, PaddedAttention(bias), n)


def _packed_layers(
    bert: Bert,
    ids: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    cell_index: torch.Tensor,
    position: torch.Tensor,
    kernel: str,
    n: int,
) -> torch.Tensor:
    attend = PackedAttention(cu_seqlens, max_seqlen, cell_index, position, kernel)
    return Bert.forward(bert, ids, positions, attend, n)


@lru_cache(maxsize=1)
def _compiled() -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    # The attention strategy is rebuilt inside the compiled function from its tensors: an
    # object passed in is guarded by identity on older torch (2.4), recompiling every batch.
    # The module is an argument, so all models share one compiled function each; they call
    # Bert.forward itself, since the instance's forward is the dispatcher below meanwhile.
    # mode="default" is the mode without CUDA graphs.
    return (
        torch.compile(_padded_layers, dynamic=True, mode="default"),
        torch.compile(_packed_layers, dynamic=True, mode="default"),
    )


@contextlib.contextmanager
def _through_compiled(bert: Bert) -> Iterator[None]:
    padded, packed = _compiled()

    def forward(
        ids: torch.Tensor,
        positions: torch.Tensor,
        attend: PaddedAttention | PackedAttention,
        n: int,
        position_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_offset is not None:  # the first-order screen's moved positions: eager
            return type(bert).forward(bert, ids, positions, attend, n, position_offset)
        if isinstance(attend, PaddedAttention):
            return padded(bert, ids, positions, attend.bias, n)
        return packed(
            bert,
            ids,
            positions,
            attend.cu_seqlens,
            attend.max_seqlen,
            attend.cell_index,
            attend.position,
            attend.kernel,
            n,
        )

    bert.forward = forward
    try:
        yield
    finally:
        del bert.forward


class EncoderRunner:
    """Hidden states of padded or packed batches, as the plan says (eager or compiled).

    Parameters
    ----------
    model
        The encoder.
    plan
        Its packed kernel (a padded plan runs packed batches through the padded stand-in)
        and whether to compile.
    """

    def __init__(self, model: Geneformer, plan: ExecutionPlan) -> None:
        self.model = model
        self.attention = plan.attention
        self.compiled = plan.compile

    def _context(self) -> contextlib.AbstractContextManager[None]:
        return _through_compiled(self.model.bert) if self.compiled else contextlib.nullcontext()

    def padded(
        self, ids: torch.Tensor, keep: torch.Tensor | None, *, layer: int, validate: bool = True
    ) -> torch.Tensor:
        """:meth:`Geneformer.hidden_states` of a padded batch."""
        with self._context():
            return self.model.hidden_states(ids, keep, layer=layer, validate=validate)

    def packed(
        self, ids: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, *, layer: int
    ) -> torch.Tensor:
        """:meth:`Geneformer.hidden_states_packed` with the plan's packed kernel."""
        with self._context():
            return self.model.hidden_states_packed(
                ids, cu_seqlens, longest, layer=layer, attention=self.attention
            )
