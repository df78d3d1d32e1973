"""The attention paths: padded batches (SDPA with a key mask) and packed cells (three kernels).

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
except ImportError:  # torch < 2.10: the execution plan never picks the "varlen" kernel
    varlen_attn = None

PACKED_KERNELS = ("varlen", "nested", "padded")


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

    Three kernels compute the same maths; the execution plan (:mod:`scgeneformer._plan`)
    picks one:

    - ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 over the
      offsets; CUDA capability 8.0+, float16/bfloat16). It has no attention-probability
      dropout: in training on this kernel attention dropout is skipped (hidden dropout
      still applies);
    - ``"nested"``: the cells as a nested jagged tensor through SDPA (any device);
    - ``"padded"``: a stand-in that scatters the cells into a padded ``(cells, max_seqlen)``
      buffer, runs SDPA with a key mask and gathers the tokens back.

    Parameters
    ----------
    cu_seqlens
        Int32 offsets ``(cells + 1,)``: cell ``i`` holds tokens ``cu_seqlens[i]:cu_seqlens[i+1]``,
        and the last offset equals the number of tokens (``varlen_attn`` leaves any token past
        it unwritten, which turns gradients to NaN).
    max_seqlen
        Upper bound on any cell's length.
    cell_index, position
        Per token: its cell and its position inside the cell (from :func:`packed_positions`).
    kernel
        One of :data:`PACKED_KERNELS`.
    """

    def __init__(
        self,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        cell_index: torch.Tensor,
        position: torch.Tensor,
        kernel: str = "padded",
    ) -> None:
        if kernel not in PACKED_KERNELS:
            raise ValueError(f"kernel must be one of {PACKED_KERNELS}, got {kernel!r}.")
        if kernel == "varlen" and varlen_attn is None:
            raise RuntimeError(f"varlen_attn needs torch 2.10+ (this torch: {torch.__version__}).")
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = int(max_seqlen)
        self.cell_index = cell_index
        self.position = position
        self.kernel = kernel

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """Attend within each cell; ``q``, ``k``, ``v`` and the result are ``(T, H, D)``."""
        if self.kernel == "varlen":
            # The seven positional arguments: the only call form that works from torch 2.10
            # (where an is_causal argument came fifth) to 2.14.
            return varlen_attn(
                q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen
            )
        if self.kernel == "nested":
            return self._nested(q, k, v, dropout_p)
        return self._padded_standin(q, k, v, dropout_p)

    def _nested(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        offsets = self.cu_seqlens.long()

        def jagged(x: torch.Tensor) -> torch.Tensor:
            # (cells, ragged length, heads, dim) -> (cells, heads, ragged length, dim); SDPA
            # refuses nested views of the fused q/k/v projection, hence the copy.
            nested = torch.nested.nested_tensor_from_jagged(
                x.contiguous(), offsets=offsets, max_seqlen=self.max_seqlen
            )
            return nested.transpose(1, 2)

        out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout_p)
        return out.transpose(1, 2).values()

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
