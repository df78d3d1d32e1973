"""Synthetic two-state single-cell data with planted driver genes and known ground truth."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

GENE_ROLES = ("driver", "target", "housekeeping", "neutral")
GENE_ID_PREFIX = "ENSGSYN"

# Fixed shape parameters of the simulation, in natural-log units of a gene's expression rate.
# They are constants rather than arguments because the documented model depends on them and
# the arguments already span the behaviour that tests and tutorials need to vary.
_BASE_SD = 1.5  # spread of neutral genes' base levels: rates span about three orders of magnitude
_HOUSEKEEPING_LEVEL = 2.5  # about a fifth of a cell's counts go to 50 housekeeping genes
_HOUSEKEEPING_SD = 0.5
_ACTIVITY_SD = 0.7  # within-state variation of a driver, what makes targets co-vary inside a state
_TARGET_NOISE_SD = 0.3
_LOADING_RANGE = (0.5, 1.0)  # targets follow their driver with a gene-specific slope
_DONOR_SD = 0.15
_MARKER_LOG2FC_RANGE = (1.0, 3.0)
_MARKER_FRACTION = 0.2  # share of neutral genes that carry a cell-type programme
# Quantiles of the neutral base levels at which a gene sits in the state where it is high: the
# drivers then rank among the top few hundred genes of the cells where they are up, so they
# are in those cells' token lists whatever the effect size.
_DRIVER_HIGH_QUANTILES = (0.8, 0.95)
_TARGET_HIGH_QUANTILES = (0.6, 0.95)


def synthetic_states(
    n_cells: int = 2000,
    n_genes: int = 600,
    *,
    n_drivers: int = 6,
    n_down_drivers: int = 0,
    n_targets_per_driver: int = 8,
    n_housekeeping: int = 50,
    state_names: Sequence[str] = ("healthy", "disease"),
    disease_fraction: float = 0.5,
    n_cell_types: int = 2,
    n_donors: int = 4,
    effect_size: float = 2.0,
    mean_library_size: float = 3000.0,
    library_size_cv: float = 0.5,
    dispersion: float = 0.2,
    random_state: int | None = 0,
) -> AnnData:
    r"""Simulate counts of cells in two states, driven by a few planted regulator genes.

    A small gene-regulatory model: a handful of *driver* genes change between a reference
    state (``state_names[0]``, e.g. healthy) and a second state (``state_names[1]``, e.g.
    disease), and each driver pulls a set of *target* genes along with it. Housekeeping genes
    are high and stable; the remaining *neutral* genes have heavy-tailed base levels, and some
    of them mark cell types, so the cells have structure that has nothing to do with state.
    Counts are negative binomial with varying library sizes. Everything a perturbation screen
    should recover is recorded in ``var``: removing a driver from a disease cell's gene list
    is what should move that cell toward the healthy state.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes. Must hold the drivers, their targets, the housekeeping genes and at
        least one neutral gene (at least ``n_cell_types`` with several cell types).
    n_drivers
        Number of driver genes.
    n_down_drivers
        How many of the drivers are lower, rather than higher, in the second state.
    n_targets_per_driver
        Target genes regulated by each driver.
    n_housekeeping
        Highly and stably expressed genes.
    state_names
        The two state labels: the reference state first, the perturbed (disease) state second.
    disease_fraction
        Share of cells in the second state, strictly between 0 and 1.
    n_cell_types
        Number of cell types; each type beyond a single one gets its own marker programme.
    n_donors
        Number of donors; every donor contributes cells of both states, so donors can serve
        as groups for splits that keep a donor's cells together.
    effect_size
        Log2 fold change of a driver's expression rate between the states (0 gives a null
        data set in which the "drivers" do nothing).
    mean_library_size
        Mean total counts per cell.
    library_size_cv
        Coefficient of variation of the library sizes (0 makes them all equal in expectation).
    dispersion
        Negative-binomial dispersion :math:`\phi`: variance :math:`\mu + \phi\mu^2`
        (0 gives Poisson counts).
    random_state
        Seed; the same seed gives the same data. ``None`` draws a fresh seed, which is
        recorded in ``uns`` so the data can be made again.

    Returns
    -------
    AnnData
        ``X``: counts as a :class:`scipy.sparse.csr_matrix` of float32 integers.

        ``obs``: ``state`` (categorical, categories ``state_names``), ``cell_type``
        (categorical), ``donor`` (categorical), ``n_counts`` (total counts).

        ``var`` (index: synthetic Ensembl-like IDs such as ``ENSGSYN00000000001``, never real
        ones): ``gene_symbol`` (``DRV1``, ``TGT1_3`` for the third target of ``DRV1``,
        ``HK5``, ``NEU12``), ``gene_role`` (categorical: driver, target, housekeeping,
        neutral), ``driver_of`` (a target's driver ID, ``""`` otherwise), ``marker_of`` (the
        cell type a neutral gene marks, ``""`` otherwise), ``is_state_gene`` (drivers and
        targets), ``true_effect`` (planted log2 fold change of the expression rate, second
        state over first).

        ``uns["synthetic_states"]``: the arguments, with the seed actually used.

    Raises
    ------
    ValueError
        If an argument is out of range or the genes cannot hold the requested roles.
    TypeError
        If an argument has the wrong type.

    Notes
    -----
    Cell :math:`c` has state :math:`s_c \in \{0, 1\}` (exactly
    ``round(n_cells * disease_fraction)`` cells in state 1, in random order), a cell type
    :math:`t_c` drawn uniformly, a donor :math:`k_c` (cells of each state dealt evenly to
    donors) and a library size
    :math:`L_c \sim \mathrm{LogNormal}(\log m - \sigma_L^2/2,\ \sigma_L^2)` with
    :math:`\sigma_L^2 = \log(1 + \mathrm{cv}^2)`, so its mean is ``mean_library_size`` =
    :math:`m` and its CV ``library_size_cv``. In natural-log units, with
    :math:`\delta_d = \pm\,\text{effect\_size} \cdot \log 2` (negative for down drivers),
    each driver :math:`d` has a latent activity

    .. math:: a_{cd} = \delta_d s_c + \varepsilon_{cd}, \quad
              \varepsilon_{cd} \sim N(0, 0.7^2),

    and gene :math:`g` a log expression rate :math:`\eta_{cg}`:

    - neutral: :math:`b_g + \gamma_g [t_c = \tau_g] + u_{k_c g}` with
      :math:`b_g \sim N(0, 1.5^2)` (log-normal, heavy-tailed rates); with several cell types
      a fifth of the neutral genes mark one type :math:`\tau_g` each, up by
      :math:`\gamma_g` = 1 to 3 log2 units; donor effects :math:`u \sim N(0, 0.15^2)`;
    - housekeeping: :math:`b_g \sim N(2.5, 0.5^2)`, with no state, type or donor effect;
    - driver: :math:`b_d + a_{cd} + u_{k_c d}`;
    - target of driver :math:`d`: :math:`b_g + w_g a_{cd} + u_{k_c g} + \xi_{cg}` with
      loading :math:`w_g \sim U(0.5, 1)` and :math:`\xi_{cg} \sim N(0, 0.3^2)`, so targets
      follow their driver from cell to cell, within each state as well as between them.

    A driver's level in the state where it is high sits at a random 80th-95th percentile of
    the neutral base levels (a target's at the 60th-95th), whatever the effect size, so
    drivers rank among the top few hundred genes of the cells where they are up and are in
    those cells' token lists. The planted ``true_effect`` is :math:`\delta_d / \log 2` for a
    driver, :math:`w_g \delta_d / \log 2` for a target and 0 otherwise: the activity noise
    has the same distribution in both states, so it is exactly the log2 ratio of mean rates.
    The mean count is :math:`\mu_{cg} = L_c\, e^{\eta_{cg}} / \sum_h e^{\eta_{ch}}` and the
    count is gamma-Poisson, :math:`x_{cg} \sim \mathrm{Poisson}(\lambda_{cg})` with
    :math:`\lambda_{cg} \sim \mathrm{Gamma}(1/\phi,\ \phi\mu_{cg})`. Because library size is
    independent of state, raising the state genes takes a little of every other gene's
    share: on normalised data the other genes fall by about 4% in the second state (with
    the defaults), which a test on thousands of cells can call significant for the highly
    expressed ones. ``true_effect`` records the planted change only.

    Genes are placed in random order and numbered in that order, so neither a gene's
    position nor its ID (which breaks exact ties in rank tokenization) gives its role away.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> adata = sgf.datasets.synthetic_states(n_cells=500, random_state=1)
    >>> adata
    AnnData object with n_obs × n_vars = 500 × 600
        obs: 'state', 'cell_type', 'donor', 'n_counts'
        var: 'gene_symbol', 'gene_role', 'driver_of', 'marker_of', 'is_state_gene', 'true_effect'
        uns: 'synthetic_states'
    >>> adata.obs["state"].value_counts().sort_index()
    state
    healthy    250
    disease    250
    Name: count, dtype: int64
    >>> drivers = adata.var.query("gene_role == 'driver'")
    >>> drivers["true_effect"].tolist()
    [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    """
    design = _Design(
        state_names=_check_state_names(state_names),
        n_cells=_check_int("n_cells", n_cells, minimum=2),
        n_genes=_check_int("n_genes", n_genes, minimum=1),
        n_drivers=_check_int("n_drivers", n_drivers, minimum=1),
        n_down_drivers=_check_int("n_down_drivers", n_down_drivers, minimum=0),
        n_targets_per_driver=_check_int("n_targets_per_driver", n_targets_per_driver, minimum=0),
        n_housekeeping=_check_int("n_housekeeping", n_housekeeping, minimum=0),
        disease_fraction=_check_real("disease_fraction", disease_fraction),
        n_cell_types=_check_int("n_cell_types", n_cell_types, minimum=1),
        n_donors=_check_int("n_donors", n_donors, minimum=1),
        effect_size=_check_real("effect_size", effect_size, minimum=0.0),
        mean_library_size=_check_real("mean_library_size", mean_library_size),
        library_size_cv=_check_real("library_size_cv", library_size_cv, minimum=0.0),
        dispersion=_check_real("dispersion", dispersion, minimum=0.0),
        random_state=(
            int(np.random.SeedSequence().generate_state(1)[0])
            if random_state is None
            else _check_int("random_state", random_state, minimum=0)
        ),
    )
    design.check()
    # The draws below happen in one fixed order (cells, gene levels, rates, counts, gene
    # order), so a seed keeps giving the same data.
    rng = np.random.default_rng(design.random_state)
    cells = _simulate_cells(design, rng)
    genes = _gene_levels(design, rng)
    eta = _log_rates(design, cells, genes, rng)
    counts = _draw_counts(design, cells.library, eta, rng)
    var, order = _gene_annotations(design, genes, rng)
    return AnnData(
        X=sparse.csr_matrix(counts[:, order]),
        obs=_cell_annotations(design, cells, counts),
        var=var,
        uns={
            "synthetic_states": dataclasses.asdict(design)
            | {"state_names": list(design.state_names)}
        },
    )


@dataclasses.dataclass(frozen=True)
class _Design:
    """The checked arguments of :func:`synthetic_states`, and the block sizes they imply."""

    n_cells: int
    n_genes: int
    n_drivers: int
    n_down_drivers: int
    n_targets_per_driver: int
    n_housekeeping: int
    state_names: tuple[str, str]
    disease_fraction: float
    n_cell_types: int
    n_donors: int
    effect_size: float
    mean_library_size: float
    library_size_cv: float
    dispersion: float
    random_state: int

    @property
    def n_disease(self) -> int:
        return round(self.n_cells * self.disease_fraction)

    @property
    def n_targets(self) -> int:
        return self.n_drivers * self.n_targets_per_driver

    @property
    def n_neutral(self) -> int:
        return self.n_genes - self.n_drivers - self.n_targets - self.n_housekeeping

    @property
    def blocks(self) -> tuple[int, int, int]:
        """Where targets, housekeeping and neutral genes start (drivers start at 0)."""
        i_tgt = self.n_drivers
        i_hk = i_tgt + self.n_targets
        return i_tgt, i_hk, i_hk + self.n_housekeeping

    def check(self) -> None:
        """Refuse combinations of arguments that cannot hold the requested cells and genes."""
        if self.n_down_drivers > self.n_drivers:
            raise ValueError(
                f"n_down_drivers={self.n_down_drivers} is more than n_drivers={self.n_drivers}; "
                "the down drivers are a subset of the drivers."
            )
        if not 0.0 < self.disease_fraction < 1.0:
            raise ValueError(
                "disease_fraction must be strictly between 0 and 1, got "
                f"{self.disease_fraction}: both states need cells."
            )
        if self.mean_library_size <= 0.0:
            raise ValueError(f"mean_library_size must be positive, got {self.mean_library_size}.")
        counts_per_state = {
            self.state_names[0]: self.n_cells - self.n_disease,
            self.state_names[1]: self.n_disease,
        }
        for name, count in counts_per_state.items():
            if count < self.n_donors:
                raise ValueError(
                    f"n_cells={self.n_cells} with disease_fraction={self.disease_fraction} "
                    f"gives {count} {name!r} cells, fewer than n_donors={self.n_donors}; every "
                    "donor needs cells of both states. Raise n_cells, or lower n_donors."
                )
        n_state_genes = self.n_drivers + self.n_targets
        min_neutral = self.n_cell_types if self.n_cell_types > 1 else 1
        if self.n_neutral < min_neutral:
            raise ValueError(
                f"n_genes={self.n_genes} is too small: {self.n_drivers} drivers x (1 + "
                f"{self.n_targets_per_driver} targets) + {self.n_housekeeping} housekeeping "
                f"genes take {n_state_genes + self.n_housekeeping}, and at least {min_neutral} "
                "neutral gene(s) must remain (one per cell type). Use n_genes >= "
                f"{n_state_genes + self.n_housekeeping + min_neutral}."
            )


class _Cells(NamedTuple):
    state: np.ndarray  # 0 or 1 per cell
    donor: np.ndarray
    cell_type: np.ndarray
    library: np.ndarray


class _GeneLevels(NamedTuple):
    delta: np.ndarray  # per driver: change of log rate in state 1
    driver_base: np.ndarray
    target_driver: np.ndarray  # per target: its driver's block position
    loading: np.ndarray
    target_base: np.ndarray
    housekeeping_base: np.ndarray
    neutral_base: np.ndarray
    marker_type: np.ndarray  # per neutral gene: the cell type it marks, -1 for none
    marker_effect: np.ndarray


def _simulate_cells(design: _Design, rng: np.random.Generator) -> _Cells:
    """Draw each cell's state, donor (dealt evenly per state), cell type and library size."""
    n_cells, n_disease = design.n_cells, design.n_disease
    state = rng.permutation(np.repeat(np.array([0, 1]), [n_cells - n_disease, n_disease]))
    donor = np.empty(n_cells, dtype=np.int64)
    for s in (0, 1):
        members = np.flatnonzero(state == s)
        donor[members] = rng.permutation(np.arange(members.size) % design.n_donors)
    cell_type = rng.integers(design.n_cell_types, size=n_cells)
    sigma2_lib = math.log1p(design.library_size_cv**2)
    library = rng.lognormal(
        math.log(design.mean_library_size) - sigma2_lib / 2, math.sqrt(sigma2_lib), size=n_cells
    )
    return _Cells(state, donor, cell_type, library)


def _gene_levels(design: _Design, rng: np.random.Generator) -> _GeneLevels:
    """Draw base levels of every gene block, the drivers' state effect and the markers."""
    n_drivers, n_neutral = design.n_drivers, design.n_neutral
    neutral_base = rng.normal(0.0, _BASE_SD, size=n_neutral)
    direction = np.ones(n_drivers)
    direction[n_drivers - design.n_down_drivers :] = -1.0
    delta = direction * design.effect_size * math.log(2.0)
    driver_high = np.quantile(neutral_base, rng.uniform(*_DRIVER_HIGH_QUANTILES, size=n_drivers))
    driver_base = driver_high - np.maximum(delta, 0.0)

    target_driver = np.repeat(np.arange(n_drivers), design.n_targets_per_driver)
    loading = rng.uniform(*_LOADING_RANGE, size=design.n_targets)
    target_high = np.quantile(
        neutral_base, rng.uniform(*_TARGET_HIGH_QUANTILES, size=design.n_targets)
    )
    target_base = target_high - loading * np.maximum(delta[target_driver], 0.0)

    housekeeping_base = rng.normal(
        _HOUSEKEEPING_LEVEL, _HOUSEKEEPING_SD, size=design.n_housekeeping
    )

    marker_type = np.full(n_neutral, -1)
    marker_effect = np.zeros(n_neutral)
    if design.n_cell_types > 1:
        per_type = max(1, round(_MARKER_FRACTION * n_neutral / design.n_cell_types))
        chosen = rng.choice(n_neutral, size=per_type * design.n_cell_types, replace=False)
        marker_type[chosen] = np.repeat(np.arange(design.n_cell_types), per_type)
        marker_effect[chosen] = rng.uniform(*_MARKER_LOG2FC_RANGE, size=chosen.size) * math.log(2)
    return _GeneLevels(
        delta,
        driver_base,
        target_driver,
        loading,
        target_base,
        housekeeping_base,
        neutral_base,
        marker_type,
        marker_effect,
    )


def _log_rates(
    design: _Design, cells: _Cells, genes: _GeneLevels, rng: np.random.Generator
) -> np.ndarray:
    """Draw log expression rates, cells x genes (drivers | targets | housekeeping | neutral)."""
    i_tgt, i_hk, i_neu = design.blocks
    activity = genes.delta * cells.state[:, None] + rng.normal(
        0.0, _ACTIVITY_SD, size=(design.n_cells, design.n_drivers)
    )
    eta = np.empty((design.n_cells, design.n_genes))
    eta[:, :i_tgt] = genes.driver_base + activity
    eta[:, i_tgt:i_hk] = (
        genes.target_base
        + genes.loading * activity[:, genes.target_driver]
        + rng.normal(0.0, _TARGET_NOISE_SD, size=(design.n_cells, design.n_targets))
    )
    eta[:, i_hk:i_neu] = genes.housekeeping_base
    eta[:, i_neu:] = genes.neutral_base + genes.marker_effect * (
        cells.cell_type[:, None] == genes.marker_type
    )
    donor_effect = rng.normal(0.0, _DONOR_SD, size=(design.n_donors, design.n_genes))
    donor_effect[:, i_hk:i_neu] = 0.0
    return eta + donor_effect[cells.donor]


def _draw_counts(
    design: _Design, library: np.ndarray, eta: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw gamma-Poisson counts whose means are each cell's library split by its rates."""
    # A softmax of the rates, shifted to avoid overflow.
    eta = eta - eta.max(axis=1, keepdims=True)
    share = np.exp(eta)
    share /= share.sum(axis=1, keepdims=True)
    mean = library[:, None] * share
    if design.dispersion > 0.0:
        mean = rng.gamma(1.0 / design.dispersion, design.dispersion * mean)
    return rng.poisson(mean).astype(np.float32)


def _gene_annotations(
    design: _Design, genes: _GeneLevels, rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray]:
    """Build ``var`` in shuffled gene order, and return that order (block position per gene)."""
    n_drivers, n_targets_per_driver = design.n_drivers, design.n_targets_per_driver
    i_tgt, i_hk, i_neu = design.blocks
    symbols = np.array(
        [f"DRV{d + 1}" for d in range(n_drivers)]
        + [f"TGT{d + 1}_{j + 1}" for d in range(n_drivers) for j in range(n_targets_per_driver)]
        + [f"HK{i + 1}" for i in range(design.n_housekeeping)]
        + [f"NEU{i + 1}" for i in range(design.n_neutral)],
        dtype=object,
    )
    role = np.repeat(
        np.array(GENE_ROLES, dtype=object),
        [n_drivers, design.n_targets, design.n_housekeeping, design.n_neutral],
    )
    ln2 = math.log(2.0)
    true_effect = np.zeros(design.n_genes)
    true_effect[:i_tgt] = genes.delta / ln2
    true_effect[i_tgt:i_hk] = genes.loading * genes.delta[genes.target_driver] / ln2
    marker_of = np.full(design.n_genes, "", dtype=object)
    marks = genes.marker_type >= 0
    marker_of[i_neu:][marks] = _type_names(design)[genes.marker_type[marks]]

    order = rng.permutation(design.n_genes)
    gene_ids = np.array(
        [f"{GENE_ID_PREFIX}{i + 1:011d}" for i in range(design.n_genes)], dtype=object
    )
    # The driver of each target, as the ID the driver gets after shuffling.
    id_of_block_position = np.empty(design.n_genes, dtype=object)
    id_of_block_position[order] = gene_ids
    driver_of = np.full(design.n_genes, "", dtype=object)
    driver_of[i_tgt:i_hk] = id_of_block_position[genes.target_driver]
    var = pd.DataFrame(
        {
            "gene_symbol": symbols[order],
            "gene_role": pd.Categorical(role[order], categories=list(GENE_ROLES)),
            "driver_of": driver_of[order],
            "marker_of": marker_of[order],
            "is_state_gene": np.isin(role[order], ["driver", "target"]),
            "true_effect": true_effect[order],
        },
        index=pd.Index(gene_ids),
    )
    return var, order


def _type_names(design: _Design) -> np.ndarray:
    return np.array([f"type_{t + 1}" for t in range(design.n_cell_types)], dtype=object)


def _cell_annotations(design: _Design, cells: _Cells, counts: np.ndarray) -> pd.DataFrame:
    """Build ``obs``: state, cell type, donor and total counts."""
    width = len(str(design.n_cells - 1))
    donors = [f"donor_{k + 1}" for k in range(design.n_donors)]
    return pd.DataFrame(
        {
            "state": pd.Categorical.from_codes(cells.state, categories=list(design.state_names)),
            "cell_type": pd.Categorical.from_codes(
                cells.cell_type, categories=list(_type_names(design))
            ),
            "donor": pd.Categorical.from_codes(cells.donor, categories=donors),
            "n_counts": counts.sum(axis=1, dtype=np.float64),
        },
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(design.n_cells)]),
    )


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def _check_real(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    return value


def _check_state_names(state_names: Sequence[str]) -> tuple[str, str]:
    is_sequence = isinstance(state_names, Sequence | np.ndarray) and not isinstance(
        state_names, str
    )
    if not is_sequence or len(state_names) != 2:
        raise ValueError(
            "state_names must be two labels (reference state, perturbed state), "
            f"got {state_names!r}."
        )
    first, second = state_names
    if not (isinstance(first, str) and isinstance(second, str) and first and second):
        raise TypeError(f"state_names must be two non-empty strings, got {state_names!r}.")
    if first == second:
        raise ValueError(f"state_names must be two different labels, got {state_names!r}.")
    return str(first), str(second)
