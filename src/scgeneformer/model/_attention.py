"""The two attention paths: padded batches (SDPA with a key mask) and packed cells (varlen).

Both receive per-token query, key and value of shape ``(..., heads, head_dim)`` and return the
attended values in that shape, so the layers above them are shared. Everything that depends on
the data (masks, offsets, positions) is computed once per forward pass, before the layers, so
the per-layer code has no data-dependent Python control flow and traces cleanly under
``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.9: the packed path uses the padded stand-in everywhere
    varlen_attn = None

_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def key_padding_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``(batch, 1, 1, length)``: 0 where ``keep``, dtype-min elsewhere.

    A finite minimum (as transformers uses) rather than ``-inf`` keeps rows that are all
    padding finite instead of NaN.
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class PaddedAttention:
    """Attention over a padded batch ``(batch, length, heads, head_dim)``.

    Parameters
    ----------
    bias
        Additive key bias from :func:`key_padding_bias`, or None when no token is padding
        (which lets CUDA pick its fastest, mask-free kernels).
    """

    def __init__(self, bias: torch.Tensor | None) -> None:
        self.bias = bias

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Attend within each row; ``q``, ``k``, ``v`` and the result are ``(B, L, H, D)``."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=self.bias,
            dropout_p=dropout_p,
        )
        return out.transpose(1, 2)


class PackedAttention:
    """Attention over cells packed end to end ``(tokens, heads, head_dim)``, without padding.

    On CUDA in float16/bfloat16 this calls ``torch.nn.attention.varlen.varlen_attn`` (flash
    attention over cumulative offsets). Elsewhere a stand-in scatters the cells into a padded
    ``(cells, max_seqlen)`` buffer, runs SDPA with a key mask and gathers the tokens back: the
    same maths, so the packing logic can be tested on a CPU.

    ``varlen_attn`` has no attention-probability dropout; in training on that path attention
    dropout is skipped (hidden dropout still applies).

    Parameters
    ----------
    cu_seqlens
        Int32 offsets ``(cells + 1,)``: cell ``i`` holds tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.
    max_seqlen
        Upper bound on any cell's length.
    cell_index, position
        Per token: its cell and its position inside the cell (from :func:`packed_positions`).
    """

    def __init__(
        self,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        cell_index: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self.cell_index = cell_index
        self.position = position

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Attend within each cell; ``q``, ``k``, ``v`` and the result are ``(T, H, D)``."""
        if varlen_attn is not None and q.is_cuda and q.dtype in _VARLEN_DTYPES:
            return varlen_attn(
                q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen
            )
        return self._padded_standin(q, k, v, dropout_p)

    def _padded_standin(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        n_cells = self.cu_seqlens.numel() - 1
        index = (self.cell_index, self.position)

        def scatter(x: torch.Tensor) -> torch.Tensor:
            buf = x.new_zeros((n_cells, self.max_seqlen, *x.shape[1:]))
            return buf.index_put(index, x).transpose(1, 2)

        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        keep = torch.arange(self.max_seqlen, device=q.device) < lengths[:, None]
        out = F.scaled_dot_product_attention(
            scatter(q),
            scatter(k),
            scatter(v),
            attn_mask=key_padding_bias(keep, q.dtype),
            dropout_p=dropout_p,
        )
        return out.transpose(1, 2)[index]


def packed_positions(cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed token's cell and its position in that cell (restarting at 0 per cell).

    Examples
    --------
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    >>> [t.tolist() for t in packed_positions(cu, 5)]
    [[0, 0, 1, 1, 1], [0, 1, 0, 1, 2]]
    """
    offsets = cu_seqlens.long()
    token = torch.arange(n_tokens, device=cu_seqlens.device)
    cell = torch.searchsorted(offsets[1:], token, right=True)
    return cell, token - offsets[cell]
