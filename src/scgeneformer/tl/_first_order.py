"""First-order deletion scores: every gene of a cell from one forward and one backward pass.

Each token gets a gate ``g`` (1: present, 0: removed) that weights it as an attention key in
every layer (``log g`` added to all queries' logits for that key) and in the mean pooling.
Closing a gate removes the token from everything the other tokens see, which is the deletion
apart from the one-place shift of the later positions. At ``g = 1`` the derivative of the
score estimates, for all genes at once, what deleting each changes:
``score(deleted) - score(cell) ~ -d score / d g_j = -d score / d log g_j``.

Toward a state the score ``cos(pooled, target) - cos(original, target)`` has a non-zero
derivative, one backward pass per target. The magnitude ``1 - cos(variant, original)`` has
its minimum at the cell itself, so its gradient is zero; its leading term is
``|P d_j|^2 / (2 |o|^2)``, with ``d_j = d pooled / d g_j`` and ``P`` the projection off the
original embedding ``o``. That norm is read through ``k`` projections ``r^T P d_j`` at once
(one forward and backward of ``k`` copies of the cell): random Gaussian directions (an
unbiased estimate) or, when ``k`` reaches the hidden size, an orthonormal basis (exact).

What the gate leaves out is the one-place shift of the later positions. Measured on a
fine-tuned classifier, the gate's derivative matches closing the gate to about 1e-5, but the
shift moves the cell about as much as the gate itself (per-cell Spearman of the gate term
alone with the exact shifts: 0.27), and its linearisation at the cell has the wrong sign:
position embeddings one place apart are not close (neighbours' cosine about 0.2 in a small
model trained briefly). Toward a state the estimate therefore adds a position term, a path
integral: every token is moved a share ``t`` of the way to the position below
(``P[q] + t (P[q-1] - P[q])``), the gradient of the score with respect to that offset is read
at :data:`POSITION_STEPS` midpoints of ``t`` in (0, 1), and its product with the move,
averaged over the steps, is each token's share ``a_q`` of moving everything (integrated
gradients: the shares add up to the score of the cell moved whole). Deleting ``j`` moves the
tokens after it, so its position term is ``sum(a_q for q > j)``, weighted by
:data:`POSITION_WEIGHT`. On the same 24 cells (256 tokens) the per-cell Spearman rose to 0.92
and the recall of each cell's exact top 10 within the estimate's top 24 from 0.86 to 0.95.
The magnitude estimate (no states) keeps the gate term alone.

Two-stage screens choose their candidates in two rounds (:func:`choose_candidates`): the
leading five eighths by the estimate, deleted exactly; their errors, interpolated over the
position, correct the estimates of the other genes; the rest by the corrected estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..model import Geneformer

# Projections for the magnitude estimate: relative noise about sqrt(2 / k) per gene, enough
# to choose candidates for exact deletion, at the cost of k forwards of one cell.
MAGNITUDE_PROJECTIONS = 16
# Steps of the position term's path integral, each a moved copy of the cell in one ungated
# gradient pass (three copies cost about seven of the cell's deletions on the CPU, the gated
# pass three more; bench/RESULTS.md).
# Offline (24 cells of 256 tokens, bench/RESULTS.md), recall of each cell's exact top 10
# within the top 24 of the estimate: 1 step 0.78, 2 steps 0.91, 3 steps 0.95, 4 steps 0.96.
POSITION_STEPS = 3
# The shares add the effect of moving every later token at once as if each moved alone;
# the exact shifts say they add about half of it: fitted per cell against exact deletions
# (least squares, 24 cells) the weight was 0.55 (median); 0.5 gave the best top-24 recall
# (0.95, against 0.93 at 0.75 and 0.90 at 1).
POSITION_WEIGHT = 0.5
# Share of a cell's n_exact candidates chosen in the second round, after the first round's
# exact deletions have measured the estimate's error. Offline on 24 cells of 256 tokens
# (fine-tuned classifier, bench/RESULTS.md), recall of the exact top 10 at n = 32 / 40 / 48:
# one round 0.90 / 0.92 / 0.93; share 1/8 0.94 / 0.94 / 0.96; 1/4 0.95 / 0.96 / 0.98;
# 3/8 0.95 / 0.99 / 1.00; 1/2 0.91 / 0.97 / 1.00.
REFINE_SHARE = 0.375


def _gated_pool(
    model: Geneformer,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    layer_index: int,
    lead: int,
    trail: int,
    pooling: str,
) -> torch.Tensor:
    """Pooled embeddings ``(rows, hidden)`` of a padded batch with the token gates applied."""
    states = model.hidden_states(ids, layer=layer_index, validate=False, key_gate=log_gate)
    states = states.to(torch.promote_types(states.dtype, torch.float32))
    if pooling == "cls":
        return states[:, 0]
    place = torch.arange(ids.shape[1], device=ids.device)[None, :]
    genes = (place >= lead) & (place < lengths[:, None] - trail)
    weight = log_gate.exp() * genes
    return (weight[..., None] * states).sum(1) / weight.sum(1, keepdim=True)


def _projections(original: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, float]:
    """``k`` directions orthogonal to ``original`` and the factor that averages their squares."""
    hidden = original.numel()
    unit = original / original.norm()
    if k >= hidden:
        # An orthonormal basis of the complement: the sum of squares is exactly |P d|^2.
        eye = torch.eye(hidden, dtype=unit.dtype)
        basis = torch.linalg.qr(torch.cat([unit[:, None], eye], dim=1))[0]
        directions = basis[:, 1:hidden].T
        return torch.cat([directions, directions.new_zeros(k - hidden + 1, hidden)]), 1.0
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(k, hidden, generator=generator, dtype=unit.dtype)
    directions = directions - (directions @ unit)[:, None] * unit[None, :]
    return directions, 1.0 / k


def _position_steps(n: int, steps: int, model: Geneformer) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets moving every token ``t`` of the way to the position below, one row per step.

    Returns the offsets ``(steps, n, hidden)`` and the one-place moves ``(n, hidden)`` (zero
    at position 0, which no deletion moves).
    """
    weight = model.bert.embeddings.position_embeddings.weight.detach()[:n]
    move = torch.zeros_like(weight)
    move[1:] = weight[:-1] - weight[1:]
    move = move.to(torch.promote_types(move.dtype, torch.float32))
    # Midpoints of ``steps`` equal parts of the path from t = 0 (as is) to t = 1 (moved).
    t = (torch.arange(steps, dtype=move.dtype, device=move.device) + 0.5) / steps
    return t[:, None, None] * move[None], move


def _later_sum(values: torch.Tensor) -> torch.Tensor:
    """Per row, ``out[:, j] = values[:, j + 1:].sum()``: what deleting token ``j`` moves."""
    suffix = values.flip(1).cumsum(1).flip(1)
    return torch.cat([suffix[:, 1:], suffix.new_zeros(len(values), 1)], dim=1)


def gate_estimates(
    model: Geneformer,
    rows: list[torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    layer_index: int,
    lead: int,
    trail: int,
    pooling: str,
    n_projections: int = MAGNITUDE_PROJECTIONS,
    position_steps: int = POSITION_STEPS,
    seeds: list[int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """First-order change of each score when each token of each cell is deleted.

    The cells run as one padded batch (one forward, one backward per target): their scores
    are summed, and each cell's gradient depends on its own inputs only. Toward a state, the
    estimate is the gate term plus :data:`POSITION_WEIGHT` times the position term (module
    notes), read from ``position_steps`` copies of each cell in one pass per cell length.

    Parameters
    ----------
    model
        The encoder, in evaluation mode, on the device of ``rows``.
    rows
        The cells' token ids, each ``(length,)``.
    targets
        State embeddings to score toward; empty for the magnitude.
    layer_index, lead, trail, pooling
        Where the embedding is read and which tokens it pools.
    n_projections
        Directions for the magnitude estimate (see the module notes).
    position_steps
        Steps of the path integral of the later positions' shift (toward a state only);
        0 leaves the gate term alone.
    seeds
        Per cell, the seed of its random directions (magnitude only; default 0).

    Returns
    -------
    Per cell, per target name (or ``"magnitude"`` without targets), a ``(length,)`` tensor
    on the CPU; entries of special tokens are meaningless.

    Examples
    --------
    >>> est = gate_estimates(model, [row], {"goal": goal}, layer_index=1, lead=1, trail=1,
    ...                      pooling="mean")  # doctest: +SKIP
    >>> est[0]["goal"].shape == row.shape  # doctest: +SKIP
    True
    """
    copies = 1 if targets else n_projections
    device = rows[0].device
    lengths = torch.tensor([r.numel() for r in rows], device=device)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    kwargs = dict(layer_index=layer_index, lead=lead, trail=trail, pooling=pooling)
    if targets:
        gates = _gate_terms(model, ids, lengths, targets, **kwargs)
        found = [
            {name: gate[i, : r.numel()] for name, gate in gates.items()} for i, r in enumerate(rows)
        ]
        if position_steps:
            # Cells of one length run together, unpadded (most cells fill the context).
            for length in torch.unique(lengths).tolist():
                alike = torch.nonzero(lengths == length).flatten().tolist()
                same = torch.stack([rows[i] for i in alike])
                moved = _position_terms(model, same, targets, position_steps, **kwargs)
                for k, i in enumerate(alike):
                    for name, term in moved.items():
                        found[i][name] = found[i][name] + POSITION_WEIGHT * term[k]
        return found
    ids, lengths = ids.repeat_interleave(copies, 0), lengths.repeat_interleave(copies)
    # The exact screen runs under inference mode; its tensors are copied out of it here.
    with torch.inference_mode(False), torch.enable_grad():
        ids, lengths = ids.clone(), lengths.clone()
        gate = torch.zeros(ids.shape, device=device, requires_grad=True)
        pooled = _gated_pool(model, ids, lengths, gate, **kwargs)
        original = pooled[::copies].detach().cpu()
        seeds = seeds or [0] * len(rows)
        made = [_projections(o, copies, seed) for o, seed in zip(original, seeds, strict=True)]
        directions = torch.cat([d for d, _ in made]).to(pooled)
        (grad,) = torch.autograd.grad((directions * pooled).sum(), gate)
    squared = grad.detach().cpu().pow(2).unflatten(0, (len(rows), copies)).sum(1)
    return [
        {"magnitude": squared[i, : r.numel()] * f / (2 * o.pow(2).sum())}
        for i, (r, o, (_, f)) in enumerate(zip(rows, original, made, strict=True))
    ]


def _gate_terms(
    model: Geneformer,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    targets: dict[str, torch.Tensor],
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Per target, ``-d score / d log g`` of every token ``(cells, length)``, on the CPU."""
    # The exact screen runs under inference mode; its tensors are copied out of it here.
    with torch.inference_mode(False), torch.enable_grad():
        ids, lengths = ids.clone(), lengths.clone()
        targets = {name: target.clone() for name, target in targets.items()}
        gate = torch.zeros(ids.shape, device=ids.device, requires_grad=True)
        pooled = _gated_pool(model, ids, lengths, gate, **kwargs)
        terms, names = {}, list(targets)
        for i, name in enumerate(names):
            score = F.cosine_similarity(pooled, targets[name][None, :].to(pooled)).sum()
            (grad,) = torch.autograd.grad(score, gate, retain_graph=i < len(names) - 1)
            terms[name] = -grad.detach().cpu()
    return terms


def _position_terms(
    model: Geneformer,
    cells: torch.Tensor,
    targets: dict[str, torch.Tensor],
    steps: int,
    *,
    layer_index: int,
    lead: int,
    trail: int,
    pooling: str,
) -> dict[str, torch.Tensor]:
    """Per target, the position term of deleting each token of cells of one length.

    ``cells`` is ``(cells, length)``. Each cell runs as ``steps`` copies, each with every
    token moved part of the way down; the gradient of the score with respect to the
    offsets, times the move, averaged over the steps, is each token's share of moving all of
    them. Unpadded and ungated, the copies run on the fast attention kernels, which the
    gate's logit bias rules out. Returns ``(cells, length)`` per target, on the CPU.
    """
    n_cells, n = cells.shape
    # The exact screen runs under inference mode; its tensors are copied out of it here.
    with torch.inference_mode(False), torch.enable_grad():
        ids = cells.repeat_interleave(steps, 0).clone()
        targets = {name: target.clone() for name, target in targets.items()}
        offset, move = _position_steps(n, steps, model)
        offset = offset.repeat(n_cells, 1, 1).requires_grad_(True)
        states = model.hidden_states(ids, layer=layer_index, validate=False, position_offset=offset)
        states = states.to(torch.promote_types(states.dtype, torch.float32))
        pooled = states[:, 0] if pooling == "cls" else states[:, lead : n - trail].mean(1)
        terms, names = {}, list(targets)
        for i, name in enumerate(names):
            score = F.cosine_similarity(pooled, targets[name][None, :].to(pooled)).sum()
            (grad,) = torch.autograd.grad(score, offset, retain_graph=i < len(names) - 1)
            shares = (grad.detach() * move.to(grad)).sum(-1)
            terms[name] = _later_sum(shares.unflatten(0, (n_cells, steps)).mean(1)).cpu()
    return terms


def rank_matched_positions(
    positions: np.ndarray, chosen: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Up to ``n`` of ``positions`` outside ``chosen``, each near the rank of a chosen one.

    Candidates chosen for their estimates are not a null; a random set of the cell's other
    genes at matching rank positions is (deleting a highly ranked gene moves any cell more).
    The chosen positions are visited in random order, cycling if ``n`` exceeds them, and each
    takes the nearest free position (ties broken at random).

    Examples
    --------
    >>> rank_matched_positions(np.arange(10), np.array([0, 1]), 2, np.random.default_rng(0))
    array([2, 3])
    """
    free = np.setdiff1d(positions, chosen)
    n = min(int(n), len(free))
    if n == 0 or len(chosen) == 0:
        return rng.choice(free, size=n, replace=False) if n else free[:0]
    taken = np.zeros(len(free), dtype=bool)
    anchors = rng.permutation(chosen)
    picked = []
    for i in range(n):
        distance = np.abs(free - anchors[i % len(anchors)]).astype(np.float64)
        distance[taken] = np.inf
        nearest = np.flatnonzero(distance == distance.min())
        pick = nearest[rng.integers(len(nearest))]
        taken[pick] = True
        picked.append(free[pick])
    return np.sort(np.array(picked, dtype=positions.dtype))


def choose_candidates(
    estimate: torch.Tensor,
    positions: torch.Tensor,
    n: int,
    probe: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    refine_share: float = REFINE_SHARE,
) -> np.ndarray:
    """Which ``n`` of a cell's genes to delete exactly, from their first-order estimates.

    Without ``probe``: the ``n`` largest estimates. With it, two rounds: the leading
    ``n - round(refine_share * n)`` estimates are scored exactly by ``probe``; the error of
    the estimate (exact minus estimate) at those genes, interpolated linearly over the
    token position (flat beyond the outermost), is added to every other gene's estimate;
    the remaining places go to the largest corrected estimates. The error is mostly the
    shift of the later positions, which the gate does not model and which varies slowly with
    the position (see the module notes).

    Parameters
    ----------
    estimate
        First-order estimates ``(genes,)`` of one cell, larger = a better candidate.
    positions
        The genes' token positions in the cell ``(genes,)``, in the order of ``estimate``.
    n
        Candidates to choose (all genes when the cell has no more than ``n``).
    probe
        Exact scores of the genes at the given indices, on the scale of ``estimate``; each
        index is asked for once.
    refine_share
        Share of ``n`` chosen after the correction.

    Returns
    -------
    Sorted indices into ``estimate``.

    Examples
    --------
    >>> est = torch.tensor([3.0, 1.0, 0.5, 2.0])
    >>> choose_candidates(est, torch.arange(4), 3)
    array([0, 1, 3])

    The estimate at position 0 is 3 too high, at position 3 right: interpolated, the error
    lowers gene 1 (position 1) more than gene 2, which takes the last place.

    >>> exact = np.array([0.0, np.nan, np.nan, 2.0])
    >>> choose_candidates(est, torch.arange(4), 3, lambda i: exact[i], refine_share=1 / 3)
    array([0, 2, 3])
    """
    order = torch.argsort(estimate, descending=True, stable=True).numpy()
    if n >= len(order):
        return np.sort(order)
    n_after = max(1, round(refine_share * n)) if probe is not None and n > 1 else 0
    if n_after == 0:
        return np.sort(order[:n])
    first = order[: n - n_after]
    values = estimate.detach().cpu().numpy().astype(np.float64)
    error = np.asarray(probe(first), dtype=np.float64) - values[first]
    where = positions.cpu().numpy().astype(np.float64)
    by_place = np.argsort(where[first])
    corrected = values + np.interp(where, where[first][by_place], error[by_place])
    corrected[first] = -np.inf
    rest = np.argsort(-corrected, kind="stable")[:n_after]
    return np.sort(np.concatenate([first, rest]))


class ExactProbe:
    """Exact deletions run while a cell's candidates are chosen, kept for its exact stage.

    Parameters
    ----------
    n
        The cell's genes screened.
    run
        ``run(index)``: pooled embeddings ``(len(index), hidden)`` of the deletions at the
        sorted ``index`` and their score on the estimate's scale; None probes nothing.
    """

    def __init__(
        self,
        n: int,
        run: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.run = run
        self.done = torch.zeros(n, dtype=torch.bool)  # which genes were deleted already
        self.pooled: torch.Tensor | None = None  # their pooled variants, in gene order

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Exact scores at ``index`` (in its order); each gene may be probed once."""
        if self.run is None:
            raise RuntimeError("This cell's screen runs no exact deletion while choosing.")
        order = np.argsort(index, kind="stable")
        pooled, score = self.run(np.asarray(index)[order])
        self.done[torch.as_tensor(index)] = True
        self.pooled = pooled
        values = np.empty(len(index), dtype=np.float64)
        values[order] = score.detach().cpu().numpy()
        return values

    def merged(self, exact: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        """Pooled variants of every ``exact`` gene in order: probed ones and ``parts``.

        ``parts`` are the variants of the genes in ``exact`` but not probed, in order.
        """
        rest = torch.cat(parts) if parts else None
        if self.pooled is None:
            return rest
        pooled = self.pooled.new_empty(int(exact.sum()), self.pooled.shape[1])
        row_of = torch.cumsum(exact.long(), 0) - 1
        pooled[row_of[self.done].to(pooled.device)] = self.pooled
        if rest is not None:
            pooled[row_of[exact & ~self.done].to(pooled.device)] = rest
        return pooled
