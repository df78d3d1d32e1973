"""The variants of a screen: each cell's perturbed token lists, embedded and scored.

For every start cell and every gene in it (or every listed gene), a variant token list is
made (the gene removed, or moved to the front), embedded at the chosen layer next to the
original, and scored by how much closer it comes to the goal state's embedding. All variants
of one cell share one length, so they run as one dense, unpadded batch that stops at the
layer read; cosines are taken on the device. With ``method="first_order"`` or
``"two_stage"`` one padded gradient pass per chunk of cells estimates every deletion first
(``_first_order``), and only the chosen positions are deleted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .._plan import ExecutionPlan
from .._progress import progress_bar
from ..model import Geneformer
from ._anchor import anchor_variants
from ._compiled import EncoderRunner
from ._downstream import GeneShifts
from ._first_order import (
    MAGNITUDE_PROJECTIONS,
    ExactProbe,
    choose_candidates,
    gate_estimates,
    rank_matched_positions,
)
from ._inference import inference_on

METHODS = ("exact", "first_order", "two_stage")
# The smallest n_exact of the bench's sweep (10, 16, 24, 32, 40, 48, 64) whose two-round
# candidates held at least 95% of each cell's exact top 10 on both data sets at 256 tokens
# (bench/bench_in_silico.py --methods --cells 48, bench/RESULTS.md): 24 held 0.948
# (synthetic_states) and 0.963 (Kang 2018), 32 held 0.963 and 0.979.
DEFAULT_N_EXACT = 32


@dataclass(frozen=True)
class Screen:
    """What a screen perturbs and against which state embeddings it scores."""

    mode: str  # "delete" or "overexpress"
    targets: dict[str, torch.Tensor]  # name -> state embedding; empty without states
    listed: np.ndarray | None  # token ids to perturb; None = every gene of each cell
    method: str = "exact"
    n_exact: int = DEFAULT_N_EXACT  # candidates per cell deleted exactly ("two_stage")
    n_background: int = DEFAULT_N_EXACT // 4  # rank-matched null genes per cell ("two_stage")
    random_state: int = 0
    gene_shifts: bool = False  # also each deletion's shift of every other gene's own state
    anchor: int | None = None  # token deleted together with each exactly deleted gene

    def exact_positions(
        self,
        c: int,
        positions: torch.Tensor,
        estimate: torch.Tensor,
        probe: ExactProbe | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of ``positions`` to delete exactly, and which of those form the baseline.

        ``probe`` scores exact deletions while the candidates are chosen (see
        :func:`choose_candidates`).
        """
        everything = torch.ones(positions.numel(), dtype=torch.bool)
        if self.method == "exact":
            return everything, everything
        if self.method == "first_order":
            return ~everything, everything
        if positions.numel() <= self.n_exact:
            return everything, everything
        candidates = choose_candidates(estimate, positions, self.n_exact, probe)
        rng = np.random.default_rng([self.random_state, int(c)])
        others = rank_matched_positions(
            np.arange(positions.numel()), candidates, self.n_background, rng
        )
        exact = torch.zeros_like(everything)
        exact[candidates] = True
        background = torch.zeros_like(everything)
        background[others] = True
        return exact | background, background


def _deleted(row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One variant per position, that token removed (later tokens shift down by one)."""
    cols = torch.arange(row.numel() - 1, device=row.device)
    return row[cols[None, :] + (cols[None, :] >= positions[:, None]).long()]


def _moved_to_front(row: torch.Tensor, positions: torch.Tensor, lead: int) -> torch.Tensor:
    """One variant per position, that token moved to the front (just after ``<cls>``)."""
    cols = torch.arange(row.numel(), device=row.device)[None, :]
    at = positions[:, None]
    shifted = cols - ((cols > lead) & (cols <= at)).long()
    return row[torch.where(cols == lead, at, shifted)]


def _inserted_in_front(
    row: torch.Tensor, inserts: torch.Tensor, lead: int, trail: int, max_length: int
) -> torch.Tensor:
    """One variant per absent token, put in front; the last gene goes if the cell is full."""
    if row.numel() >= max_length:
        row = torch.cat([row[: row.numel() - 1 - trail], row[row.numel() - trail :]])
    base = row[None, :].expand(inserts.numel(), -1)
    return torch.cat([base[:, :lead], inserts[:, None], base[:, lead:]], dim=1)


def _pool(states: torch.Tensor, lead: int, trail: int, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    return states[:, lead : states.shape[1] - trail].mean(dim=1)


def run_screen(
    model: Geneformer,
    tokens: np.ndarray,
    n_tokens: np.ndarray,
    cells: np.ndarray,
    screen: Screen,
    *,
    layer_index: int,
    pooling: str,
    plan: ExecutionPlan,
    token_budget: int,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One row per (cell, perturbed gene): cell, token, position, scores, estimates.

    With ``screen.gene_shifts`` also the (deleted, affected) downstream pairs, else None.
    """
    screener = _Screener(
        model, screen, layer_index=layer_index, pooling=pooling, plan=plan, budget=token_budget
    )
    copies = 1 if screener.targets else MAGNITUDE_PROJECTIONS
    # Consecutive cells share a gradient pass; the cell loop computes the next chunk's
    # estimates when it reaches a cell without them.
    chunks = iter(_gradient_chunks(cells, n_tokens, token_budget, copies))
    estimates: dict[int, dict[str, torch.Tensor]] = {}
    bar = progress_bar(total=len(cells), desc=f"in silico {screen.mode}", unit="cells")
    with inference_on(model, plan), bar:
        for c in cells:
            if screen.method != "exact" and c not in estimates:
                estimates = screener.first_order(tokens, n_tokens, next(chunks))
            row = torch.as_tensor(tokens[c, : n_tokens[c]].astype(np.int64), device=plan.device)
            screener.perturb(int(c), row, estimates.get(c))
            bar.update(1)
    return screener.table(), None if screener.shifts is None else screener.shifts.frame()


class _Screener:
    """Perturbs, embeds and scores one cell at a time, collecting a column per result."""

    def __init__(
        self,
        model: Geneformer,
        screen: Screen,
        *,
        layer_index: int,
        pooling: str,
        plan: ExecutionPlan,
        budget: int,
    ) -> None:
        vocab = model.vocab
        self.model, self.screen, self.device = model, screen, plan.device
        self.layer_index, self.pooling, self.budget = layer_index, pooling, budget
        self.run = EncoderRunner(model, plan)
        self.lead = self.trail = 1 if vocab.has_cls else 0
        self.special = torch.tensor(list(vocab.special_tokens.values()), device=self.device)
        self.targets = {k: v.to(self.device) for k, v in screen.targets.items()}
        self.listed = (
            None if screen.listed is None else torch.as_tensor(screen.listed, device=self.device)
        )
        self.estimated = list(self.targets) or ["magnitude"]
        self.shifts = GeneShifts(len(vocab)) if screen.gene_shifts else None
        names = ["cell", "token", "position", "exact", "baseline"]
        names += [f"score_{name}" for name in [*self.targets, "magnitude"]]
        if screen.anchor is not None:
            names += ["anchor_combined", "anchor_alone"]
        if screen.method != "exact":
            names += [f"estimate_{name}" for name in self.estimated]
        self.columns: dict[str, list[np.ndarray]] = {name: [] for name in names}
        self._cell: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {k: np.concatenate(v) if v else np.empty(0) for k, v in self.columns.items()}
        )

    def embed(self, batch: torch.Tensor, on_states=None) -> torch.Tensor:
        """Pooled states of variant rows, in slices of at most the token budget."""
        parts = []
        per_batch = max(1, self.budget // batch.shape[1])
        for start in range(0, batch.shape[0], per_batch):
            chunk = batch[start : start + per_batch]
            states = self.run.padded(chunk, None, layer=self.layer_index, validate=False).float()
            if on_states is not None:
                on_states(start, states)
            parts.append(_pool(states, self.lead, self.trail, self.pooling))
        return torch.cat(parts)

    def first_order(
        self, tokens: np.ndarray, n_tokens: np.ndarray, chunk: np.ndarray
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Estimates for a chunk of cells, from one padded forward and backward pass."""
        rows = [
            torch.as_tensor(tokens[c, : n_tokens[c]].astype(np.int64), device=self.device)
            for c in chunk
        ]
        seeds = [int(self.screen.random_state) * 1_000_003 + int(c) for c in chunk]
        found = gate_estimates(
            self.model,
            rows,
            self.targets,
            seeds=seeds,
            layer_index=self.layer_index,
            lead=self.lead,
            trail=self.trail,
            pooling=self.pooling,
        )
        return dict(zip(chunk.tolist(), found, strict=True))

    def perturb(self, c: int, row: torch.Tensor, estimate: dict[str, torch.Tensor] | None):
        """Add cell ``c``'s rows: its perturbed genes, which ran exactly, and their scores."""
        screen, listed = self.screen, self.listed
        is_gene = ~torch.isin(row, self.special)
        wanted = is_gene if listed is None else is_gene & torch.isin(row, listed)
        positions = torch.nonzero(wanted).flatten()
        inserts = row[:0]
        if screen.mode == "overexpress" and listed is not None:
            inserts = listed[~torch.isin(listed, row)]
        n_rows = positions.numel() + inserts.numel()
        if n_rows == 0:
            return
        exact = torch.ones(n_rows, dtype=torch.bool)
        baseline = exact
        probe = ExactProbe(n_rows)
        if screen.method != "exact":
            at = positions.cpu()
            for name in self.estimated:
                self.columns[f"estimate_{name}"].append(estimate[name][at].numpy())
            if screen.method == "two_stage":
                probe = ExactProbe(n_rows, partial(self._probe, row, positions, is_gene))
            exact, baseline = screen.exact_positions(c, at, estimate[self.estimated[0]][at], probe)
        self.columns["cell"].append(np.full(n_rows, c))
        self.columns["token"].append(torch.cat([row[positions], inserts]).cpu().numpy())
        where = torch.cat([positions, torch.full_like(inserts, -1)])
        self.columns["position"].append(where.cpu().numpy())
        self.columns["exact"].append(exact.numpy())
        self.columns["baseline"].append(baseline.numpy())
        scores, original = self._scores(row, positions, inserts, exact, is_gene, probe)
        for name, values in scores.items():
            self.columns[f"score_{name}"].append(values)
        if screen.anchor is not None:
            self._anchor_pairs(row, positions, exact, original)

    def _probe(
        self, row: torch.Tensor, positions: torch.Tensor, is_gene: torch.Tensor, index
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled exact deletions at ``index`` of ``positions`` and their estimated score."""
        states, original = self._original(row)
        deleted = positions[torch.as_tensor(index, device=self.device)]
        hook = None
        if self.shifts is not None:
            hook = partial(self.shifts.add, row, states[0], deleted, is_gene)
        pooled = self.embed(_deleted(row, deleted), hook)
        return pooled, _score(pooled, original, self.targets.get(self.estimated[0]))

    def _original(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the unperturbed cell's states at the layer read and its pooled embedding.

        Computed once per cell: the probe of ``two_stage`` and the exact stage share them.
        """
        if self._cell is None or self._cell[0] is not row:
            states = self.model.hidden_states(row[None, :], layer=self.layer_index, validate=False)
            states = states.float()
            self._cell = (row, states, _pool(states, self.lead, self.trail, self.pooling))
        return self._cell[1], self._cell[2]

    def _variant_sets(
        self, row: torch.Tensor, positions: torch.Tensor, inserts: torch.Tensor, pending
    ) -> list[torch.Tensor]:
        """Build the variants still to embed: ``pending`` deletions, or every overexpression."""
        if self.screen.mode == "delete":
            sets = [_deleted(row, positions[pending.to(self.device)])]
        else:
            sets = [
                _moved_to_front(row, positions, self.lead),
                _inserted_in_front(row, inserts, self.lead, self.trail, self.model.max_length),
            ]
        return [v for v in sets if v.shape[0]]

    def _scores(
        self,
        row: torch.Tensor,
        positions: torch.Tensor,
        inserts: torch.Tensor,
        exact: torch.Tensor,
        is_gene: torch.Tensor,
        probe: ExactProbe,
    ) -> tuple[dict[str, np.ndarray], torch.Tensor | None]:
        """Each score of the exact rows (NaN elsewhere), and the original's pooled state.

        Deletions the probe ran while choosing candidates are reused, not run again.
        """
        n_rows = exact.numel()
        scores = {
            name: np.full(n_rows, np.nan, np.float32) for name in [*self.targets, "magnitude"]
        }
        pending = exact & ~probe.done
        variant_sets = self._variant_sets(row, positions, inserts, pending)
        if not variant_sets and not probe.done.any():
            return scores, None
        states, original = self._original(row)
        on_states = None
        if self.shifts is not None:
            deleted = positions[pending.to(self.device)]
            on_states = partial(self.shifts.add, row, states[0], deleted, is_gene)
        pooled = probe.merged(exact, [self.embed(v, on_states) for v in variant_sets])
        ran = exact.numpy()
        for name, target in self.targets.items():
            scores[name][ran] = _score(pooled, original, target).cpu().numpy()
        scores["magnitude"][ran] = _score(pooled, original, None).cpu().numpy()
        return scores, original

    def _anchor_pairs(
        self,
        row: torch.Tensor,
        positions: torch.Tensor,
        exact: torch.Tensor,
        original: torch.Tensor | None,
    ) -> None:
        """Score the anchor deleted alone, and together with each exactly deleted gene."""
        n_rows = exact.numel()
        combined = np.full(n_rows, np.nan, np.float32)
        alone = np.full(n_rows, np.nan, np.float32)
        found = torch.nonzero(row == self.screen.anchor).flatten()
        at = int(found[0]) if found.numel() else -1
        paired = exact.to(self.device) & (positions != at)
        if at >= 0 and original is not None and bool(paired.any()):
            without, both = anchor_variants(row, at, positions[paired])
            goal = self.targets.get("goal")
            alone[:] = _score(self.embed(without), original, goal).cpu().numpy()
            combined[paired.cpu().numpy()] = _score(self.embed(both), original, goal).cpu()
        self.columns["anchor_combined"].append(combined)
        self.columns["anchor_alone"].append(alone)


def _score(pooled: torch.Tensor, original: torch.Tensor, goal: torch.Tensor | None):
    """Score variants: the shift toward ``goal``, or the magnitude without one."""
    if goal is None:
        return 1 - F.cosine_similarity(pooled, original)
    return F.cosine_similarity(pooled, goal[None, :]) - F.cosine_similarity(original, goal[None, :])


def _gradient_chunks(
    cells: np.ndarray, n_tokens: np.ndarray, token_budget: int, rows: int
) -> list[np.ndarray]:
    """Split ``cells`` into runs of consecutive cells, one padded gradient pass each.

    Each cell takes ``rows`` rows. A chunk holds at most ``token_budget`` padded tokens and,
    because masked attention keeps every layer's ``length x length`` scores for the backward
    pass, at most about 2**26 scores per head and layer (one cell always fits).
    """
    out, begin, width = [], 0, 0
    for i, c in enumerate(cells):
        wider = max(width, int(n_tokens[c]))
        count = (i - begin + 1) * rows
        if i > begin and (count * wider > token_budget or count * wider**2 > 2**26):
            out.append(cells[begin:i])
            begin, wider = i, int(n_tokens[c])
        width = wider
    out.append(cells[begin:])
    return [chunk for chunk in out if len(chunk)]
