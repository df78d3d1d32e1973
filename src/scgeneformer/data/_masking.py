"""Masked-gene modelling: pick gene positions, corrupt them 80/10/10, keep their labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..vocab import Vocabulary

# BERT's corruption of the chosen positions: most become <mask>, some a random gene, the rest
# stay as they are (so the model cannot learn that only <mask> positions matter).
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1


@dataclass(frozen=True)
class MaskedBatch:
    """A padded batch ready for masked-gene modelling.

    Attributes
    ----------
    input_ids
        ``(cells, width)`` int64 token ids with the chosen positions corrupted.
    positions
        ``(cells, width)`` boolean: where the loss is taken.
    labels
        ``(n_masked,)`` the original ids at ``positions``, in row-major order (the order of
        ``hidden[positions]``).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor

    @property
    def n_masked(self) -> int:
        """Number of positions the loss is taken on."""
        return int(self.labels.numel())


class GeneMasker:
    """Choose and corrupt gene positions as Geneformer's (BERT's) masked-gene objective does.

    In each cell, ``round(mask_fraction * n)`` of its ``n`` gene tokens (at least one) are
    chosen uniformly at random; special tokens (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``)
    never are. An exact count per cell (rather than an independent coin per token, as
    transformers' collator draws) gives every cell the same share of the loss and never an
    empty batch. Of the chosen positions 80% become ``<mask>``, 10% a gene token drawn
    uniformly from the vocabulary (never a special token) and 10% keep their token.

    All random numbers come from the ``generator`` passed per batch and are drawn for the
    whole ``(cells, width)`` shape, so a batch's masks depend only on its tokens and that
    generator's seed: the same on any device, any number of processes, and after a resume.

    Parameters
    ----------
    vocab
        The vocabulary the tokens come from.
    mask_fraction
        Share of each cell's gene tokens to predict, in (0, 1).

    Examples
    --------
    >>> import torch, scgeneformer as sgf
    >>> from scgeneformer.data._masking import GeneMasker
    >>> genes = [f"G{i}" for i in range(20)]
    >>> vocab = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    >>> masker = GeneMasker(vocab, mask_fraction=0.25)
    >>> batch = masker(torch.tensor([[5, 9, 3, 7, 0, 0], [7, 2, 8, 11, 4, 6]]),
    ...                torch.Generator().manual_seed(0))
    >>> batch.positions.sum(dim=1).tolist(), batch.n_masked
    ([1, 2], 3)
    """

    def __init__(self, vocab: Vocabulary, mask_fraction: float = 0.15) -> None:
        if not 0.0 < float(mask_fraction) < 1.0:
            raise ValueError(f"mask_fraction must lie in (0, 1), got {mask_fraction}.")
        self.mask_fraction = float(mask_fraction)
        self.mask_id = vocab.mask_id
        self.gene_ids = torch.as_tensor(vocab.gene_token_ids, dtype=torch.long)
        if self.gene_ids.numel() == 0:
            raise ValueError(f"The vocabulary {vocab.name!r} has no gene tokens to mask.")
        self.is_gene = torch.zeros(len(vocab), dtype=torch.bool)
        self.is_gene[self.gene_ids] = True

    def n_to_mask(self, n_genes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Positions chosen in cells of ``n_genes`` gene tokens (0 for cells without genes)."""
        n = torch.as_tensor(n_genes, dtype=torch.long)
        k = torch.floor(n.double() * self.mask_fraction + 0.5).long()
        return torch.where(n > 0, k.clamp(min=1), torch.zeros_like(n))

    def __call__(
        self, tokens: np.ndarray | torch.Tensor, generator: torch.Generator
    ) -> MaskedBatch:
        """Mask a right-padded ``(cells, width)`` batch of token ids (on the CPU).

        Parameters
        ----------
        tokens
            Token ids; ``<pad>`` (0) after each cell's tokens.
        generator
            A CPU generator; its seed fixes the masks.

        Returns
        -------
        The :class:`MaskedBatch`, on the CPU.
        """
        tokens = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
        tokens = tokens.long()
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (cells, width), got shape {tuple(tokens.shape)}.")
        in_range = (tokens >= 0) & (tokens < len(self.is_gene))
        is_gene = in_range & self.is_gene[tokens.clamp(0, len(self.is_gene) - 1)]
        k = self.n_to_mask(is_gene.sum(dim=1))

        # Rank a uniform key per position, non-genes last: the k smallest are a uniform draw
        # of k gene positions without replacement.
        keys = torch.rand(tokens.shape, generator=generator, dtype=torch.float64)
        keys = keys.masked_fill(~is_gene, 2.0)
        order = keys.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(tokens.shape[1]).expand_as(order).contiguous())
        chosen = rank < k[:, None]

        share = torch.rand(tokens.shape, generator=generator)
        random_gene = self.gene_ids[
            torch.randint(len(self.gene_ids), tokens.shape, generator=generator)
        ]
        to_mask = chosen & (share < MASK_TOKEN_SHARE)
        to_random = chosen & (share >= MASK_TOKEN_SHARE)
        to_random &= share < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE

        corrupted = tokens.masked_fill(to_mask, self.mask_id)
        corrupted = torch.where(to_random, random_gene, corrupted)
        return MaskedBatch(corrupted, chosen, tokens[chosen])


def batch_generator(*seed: int) -> torch.Generator:
    """Seed a CPU generator from a tuple of integers (run seed, epoch, batch, ...).

    Deriving each batch's generator from its coordinates, instead of drawing from one running
    generator, makes masks independent of which process handles the batch and of restarts.

    Examples
    --------
    >>> a = torch.rand(2, generator=batch_generator(0, 3, 17))
    >>> torch.equal(a, torch.rand(2, generator=batch_generator(0, 3, 17)))
    True
    """
    state = np.random.SeedSequence([int(s) for s in seed]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


__all__ = ["GeneMasker", "MaskedBatch", "batch_generator"]
