"""The execution plan: which attention kernel and which precision run, decided in one place.

Every tool asks :func:`execution_plan` what to run on its device. The decision itself is
:func:`choose_plan`, a pure function of :class:`Hardware` (device kind, compute capability,
torch version, the kernels this torch offers) and of what was asked for, so that every GPU a
user may have is tested on a CPU by handing it the capability and version.

The three attention paths, fastest first where they apply:

- ``"varlen"``: cells packed end to end, ``torch.nn.attention.varlen.varlen_attn``
  (FlashAttention-2; torch 2.10+, compute capability 8.0+, float16/bfloat16, no attention
  dropout);
- ``"nested"``: cells packed end to end as a nested jagged tensor, through
  ``scaled_dot_product_attention`` (its memory-efficient kernel runs from capability 5.0);
- ``"padded"``: length-bucketed padded batches with a key mask, through SDPA; everywhere.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

logger = logging.getLogger(__name__)

ATTENTIONS = ("varlen", "nested", "padded")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.float16, torch.bfloat16)

_VARLEN_TORCH = (2, 10)  # varlen_attn's first release; its 7 positional arguments hold to 2.14
_FLASH_CAPABILITY = (8, 0)  # FlashAttention-2 and native bfloat16: Ampere or newer
_FP16_CAPABILITY = (7, 0)  # tensor cores: below Volta float16 is no faster than float32
_NESTED_CAPABILITY = (5, 0)  # SDPA's memory-efficient kernel, what nested tensors use below 8.0
_CUDNN_VARLEN = 91800  # torch 2.14 sends varlen_attn to cuDNN >= 9.18 on SM 9.x/10.x


@dataclass(frozen=True)
class Hardware:
    """What the plan is decided from; :func:`probe_hardware` reads it from the machine.

    Attributes
    ----------
    device
        The device the tool runs on.
    name
        Its name (``"NVIDIA H100 80GB HBM3"``, ``"CPU"``).
    capability
        CUDA compute capability ``(major, minor)``; None off CUDA.
    torch_version
        ``(major, minor)`` of the running torch.
    has_varlen
        Whether ``torch.nn.attention.varlen.varlen_attn`` imports.
    has_nested
        Whether nested jagged tensors take length hints (``max_seqlen``), which spares a
        device synchronisation per attention call.
    cudnn
        cuDNN version as torch reports it (``91800`` = 9.18), or None.
    """

    device: torch.device
    name: str
    capability: tuple[int, int] | None
    torch_version: tuple[int, int]
    has_varlen: bool
    has_nested: bool
    cudnn: int | None = None


@dataclass(frozen=True)
class ExecutionPlan:
    """What a tool runs: attention path, compute dtype, loss scaling, compilation.

    Attributes
    ----------
    device
        Where it runs.
    device_name, capability, torch_version
        The hardware the plan was decided for (capability ``"8.0"``, or None off CUDA).
    attention
        ``"varlen"``, ``"nested"`` or ``"padded"`` (see the module docstring).
    dtype
        The compute dtype that runs (16-bit through autocast; weights stay float32).
    requested_dtype
        What was asked for (``"auto"`` or a dtype name).
    training
        Whether the plan is for training (loss scaling, attention dropout).
    loss_scaling
        Gradient scaling (``torch.amp.GradScaler``): training in float16.
    compile
        Whether inference runs the encoder through ``torch.compile`` (``sgf.settings.compile``).
    attention_backend
        ``sgf.settings.attention_backend``: ``"auto"``, ``"flash"`` or ``"cudnn"``.
    notes
        Why something asked for or faster was not used, and what to do about it.
    """

    device: torch.device
    device_name: str
    capability: str | None
    torch_version: str
    attention: str
    dtype: torch.dtype
    requested_dtype: str
    training: bool = False
    loss_scaling: bool = False
    compile: bool = False
    attention_backend: str = "auto"
    notes: tuple[str, ...] = field(default=())

    @property
    def packed(self) -> bool:
        """Whether cells go in packed end to end (no padding) rather than padded batches."""
        return self.attention != "padded"

    @property
    def dtype_name(self) -> str:
        """The compute dtype's name, ``"bfloat16"``."""
        return str(self.dtype).removeprefix("torch.")

    def as_dict(self) -> dict[str, Any]:
        """Plain strings and booleans, for ``uns`` (h5ad-safe) and JSON.

        Examples
        --------
        >>> plan = choose_plan(Hardware(torch.device("cpu"), "CPU", None, (2, 13), True, True))
        >>> plan.as_dict()["attention"], plan.as_dict()["dtype"]
        ('padded', 'float32')
        """
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "capability": self.capability or "",
            "torch": self.torch_version,
            "attention": self.attention,
            "dtype": self.dtype_name,
            "requested_dtype": self.requested_dtype,
            "training": self.training,
            "loss_scaling": self.loss_scaling,
            "compile": self.compile,
            "attention_backend": self.attention_backend,
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """One line for the log and ``scgeneformer env``."""
        where = self.device_name + (f" (capability {self.capability})" if self.capability else "")
        extras = [
            "GradScaler" if self.loss_scaling else "",
            "torch.compile" if self.compile else "",
            f"SDPA backend {self.attention_backend}" if self.attention_backend != "auto" else "",
        ]
        text = f"{self.attention} attention, {self.dtype_name}"
        text += "".join(f", {e}" for e in extras if e) + f" on {where}, torch {self.torch_version}"
        return text + "".join(f"; {n}" for n in self.notes)


def _capability_text(capability: tuple[int, int] | None) -> str | None:
    return None if capability is None else f"{capability[0]}.{capability[1]}"


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}.")
        return name
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    return dtype


def _choose_dtype(hw: Hardware, requested: str, notes: list[str]) -> torch.dtype:
    cap = hw.capability
    if hw.device.type == "cuda":
        bf16 = cap is not None and cap >= _FLASH_CAPABILITY
        fp16 = cap is not None and cap >= _FP16_CAPABILITY
        if requested == "auto":
            return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
        if requested == "bfloat16" and not bf16:
            fallback = torch.float16 if fp16 else torch.float32
            notes.append(
                f"bfloat16 needs compute capability 8.0+ (this GPU: {_capability_text(cap)}); "
                f"running {str(fallback).removeprefix('torch.')}"
            )
            return fallback
        return DTYPES[requested]
    if hw.device.type == "cpu":
        if requested == "float16":
            notes.append("CPUs have no fast float16; running float32 (bfloat16 runs on CPUs)")
            return torch.float32
        return torch.float32 if requested == "auto" else DTYPES[requested]
    return torch.float32 if requested == "auto" else DTYPES[requested]


def _varlen_blockers(hw: Hardware, dtype: torch.dtype) -> list[str]:
    """Why ``varlen_attn`` cannot run here; empty when it can."""
    version = ".".join(map(str, hw.torch_version))
    blockers = []
    if hw.device.type != "cuda":
        blockers.append(f"varlen_attn runs on CUDA only (device: {hw.device})")
    if not hw.has_varlen or hw.torch_version < _VARLEN_TORCH:
        blockers.append(f"varlen_attn needs torch 2.10+ (this torch: {version})")
    if hw.device.type == "cuda" and (hw.capability is None or hw.capability < _FLASH_CAPABILITY):
        blockers.append(
            f"varlen_attn needs compute capability 8.0+ (this GPU: "
            f"{_capability_text(hw.capability)})"
        )
    if dtype not in HALF:
        blockers.append(f"varlen_attn needs float16/bfloat16 (dtype: {dtype})")
    return blockers


def _nested_blockers(hw: Hardware) -> list[str]:
    blockers = []
    if not hw.has_nested:
        blockers.append("nested jagged tensors without device synchronisation need torch 2.5+")
    if hw.device.type == "cuda" and (hw.capability is None or hw.capability < _NESTED_CAPABILITY):
        blockers.append(
            f"nested SDPA needs compute capability 5.0+ (this GPU: "
            f"{_capability_text(hw.capability)})"
        )
    return blockers


def choose_plan(
    hardware: Hardware,
    *,
    dtype: str | torch.dtype = "auto",
    attention: str = "auto",
    training: bool = False,
    attention_dropout: float = 0.0,
    compile: bool = False,
    attention_backend: str = "auto",
) -> ExecutionPlan:
    """Decide attention path and precision for ``hardware``; the rule every tool follows.

    Precision: ``"auto"`` is bfloat16 on capability 8.0+, float16 on 7.x, float32 below and
    off CUDA. bfloat16 asked for below 8.0 becomes float16 (7.x) or float32, float16 asked
    for on a CPU becomes float32, each with a note. Training in float16 scales the loss.

    Attention, ``"auto"``: on CUDA ``varlen`` where it runs (and, in training, only without
    attention dropout, which it lacks), else ``nested`` (capability 5.0+), else ``padded``.
    Off CUDA ``padded`` (the path measured fastest on CPUs). A path asked for by name that
    cannot run here raises; ``varlen`` asked for in training with attention dropout runs
    without that dropout (noted).

    Parameters
    ----------
    hardware
        From :func:`probe_hardware`, or made by hand to plan for another machine.
    dtype
        ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
    attention
        ``"auto"`` or one of ``"varlen"``, ``"nested"``, ``"padded"``.
    training
        Plan for training (loss scaling; attention dropout matters).
    attention_dropout
        The model's ``attention_probs_dropout_prob`` (used when ``training``).
    compile, attention_backend
        Recorded in the plan (``sgf.settings.compile``, ``sgf.settings.attention_backend``).

    Returns
    -------
    The :class:`ExecutionPlan`.

    Examples
    --------
    >>> v100 = Hardware(torch.device("cuda"), "Tesla V100", (7, 0), (2, 13), True, True)
    >>> plan = choose_plan(v100, dtype="bfloat16", training=True)
    >>> plan.attention, plan.dtype_name, plan.loss_scaling
    ('nested', 'float16', True)
    >>> h100 = Hardware(torch.device("cuda"), "H100", (9, 0), (2, 13), True, True)
    >>> choose_plan(h100).attention, choose_plan(h100).dtype_name
    ('varlen', 'bfloat16')
    """
    if attention != "auto" and attention not in ATTENTIONS:
        raise ValueError(f"attention must be 'auto' or one of {ATTENTIONS}, got {attention!r}.")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}."
        )
    requested = _dtype_name(dtype)
    notes: list[str] = []
    compute = _choose_dtype(hardware, requested, notes)
    dropout = training and attention_dropout > 0
    varlen = _varlen_blockers(hardware, compute)
    nested = _nested_blockers(hardware)
    if attention == "auto":
        on_cuda = hardware.device.type == "cuda"
        if on_cuda and not varlen and not dropout:
            chosen = "varlen"
        else:
            if on_cuda and not varlen:
                notes.append(
                    f"varlen_attn has no attention dropout (the model's is {attention_dropout}); "
                    "set config.attention_probs_dropout_prob = 0 or sgf.settings.attention = "
                    "'varlen' (which skips it) to train with it"
                )
            elif on_cuda:
                notes.extend(varlen)
            chosen = "nested" if on_cuda and not nested else "padded"
            if on_cuda and chosen == "padded":
                notes.extend(nested)
    else:
        blockers = {"varlen": varlen, "nested": nested, "padded": []}[attention]
        if blockers:
            raise ValueError(
                f"attention={attention!r} cannot run here: {'; '.join(blockers)}. Use "
                "sgf.settings.attention = 'auto'."
            )
        if attention == "varlen" and dropout:
            notes.append(f"attention dropout ({attention_dropout}) is skipped by varlen_attn")
        chosen = attention
    if (
        chosen == "varlen"
        and attention_backend == "auto"
        and hardware.capability is not None
        and hardware.capability[0] in (9, 10)
        and (hardware.cudnn or 0) >= _CUDNN_VARLEN
        and hardware.torch_version >= (2, 14)
    ):
        notes.append(
            "torch sends varlen_attn to cuDNN here for cells over 128 tokens; "
            "sgf.settings.attention_backend = 'flash' keeps FlashAttention-2 (which is faster "
            "is unmeasured)"
        )
    return ExecutionPlan(
        device=hardware.device,
        device_name=hardware.name,
        capability=_capability_text(hardware.capability),
        torch_version=".".join(map(str, hardware.torch_version)),
        attention=chosen,
        dtype=compute,
        requested_dtype=requested,
        training=bool(training),
        loss_scaling=bool(training) and compute == torch.float16,
        compile=bool(compile),
        attention_backend=attention_backend,
        notes=tuple(notes),
    )


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=16)
def _probe(device: torch.device) -> Hardware:
    capability = name = None
    cudnn = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(device)!r} was asked for, but this torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Use "
                "device='cpu', or install a CUDA build of torch."
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = tuple(torch.cuda.get_device_capability(index))
        name = torch.cuda.get_device_name(index)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nested = "max_seqlen" in inspect.signature(torch.nested.nested_tensor_from_jagged).parameters
    return Hardware(
        device=device,
        name=name or device.type.upper(),
        capability=capability,
        torch_version=_torch_version(),
        has_varlen=_has_varlen(),
        has_nested=nested,
        cudnn=cudnn,
    )


def probe_hardware(device: str | torch.device) -> Hardware:
    """Read :class:`Hardware` for ``device`` from this machine (cached per device)."""
    return _probe(torch.device(device))


_logged: set[tuple[Any, ...]] = set()


def warn_if_dtype_replaced(plan: ExecutionPlan) -> None:
    """Warn when a dtype asked for by name is not the one that runs (the plan records both)."""
    if plan.requested_dtype not in ("auto", plan.dtype_name):
        warnings.warn(
            f"dtype={plan.requested_dtype!r} cannot run on {plan.device_name}: running "
            f"{plan.dtype_name} instead ({'; '.join(plan.notes)}). The results record "
            f"dtype={plan.dtype_name!r}.",
            UserWarning,
            stacklevel=4,
        )


def execution_plan(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    training: bool = False,
    attention_dropout: float = 0.0,
    log: bool = True,
) -> ExecutionPlan:
    """Decide the plan a tool runs, from its arguments, ``sgf.settings`` and this machine.

    ``device`` and ``dtype`` default to ``sgf.settings.device`` / ``.dtype``; the attention
    path, compilation and SDPA backend come from ``sgf.settings.attention``, ``.compile`` and
    ``.attention_backend``. Each distinct plan is logged once (logger ``scgeneformer._plan``,
    level INFO).

    Examples
    --------
    >>> execution_plan("cpu", "float32").describe()  # doctest: +ELLIPSIS
    'padded attention, float32 on CPU, torch ...'
    """
    from ._settings import settings

    resolved = settings.resolve_device(device)
    plan = choose_plan(
        probe_hardware(resolved),
        dtype=settings.dtype if dtype is None else dtype,
        attention=settings.attention,
        training=training,
        attention_dropout=attention_dropout,
        compile=settings.compile,
        attention_backend=settings.attention_backend,
    )
    if log:
        warn_if_dtype_replaced(plan)
    key = (str(plan.device), plan.attention, plan.dtype, plan.training, plan.compile, plan.notes)
    if log and key not in _logged:
        _logged.add(key)
        logger.info(
            "execution plan (%s): %s", "training" if training else "inference", plan.describe()
        )
    return plan


def packed_attention_for(
    device: torch.device, dtype: torch.dtype, *, training: bool, attention_dropout: float
) -> str:
    """Pick the kernel for packed cells given straight to the model (not through a tool).

    ``"padded"`` here means the stand-in that scatters packed cells into a padded buffer.
    """
    plan = execution_plan(
        device, dtype, training=training, attention_dropout=attention_dropout, log=False
    )
    return plan.attention


@contextlib.contextmanager
def attention_backend(plan: ExecutionPlan) -> Iterator[None]:
    """Keep SDPA (and torch 2.14's ``varlen_attn``) on or off cuDNN for a whole tool run.

    ``"auto"`` leaves torch's choice. ``"flash"`` excludes cuDNN from SDPA and, where torch
    routes ``varlen_attn`` to cuDNN, keeps it on FlashAttention-2 for forward and backward
    alike (the context must therefore cover the backward passes too). ``"cudnn"`` puts cuDNN
    first. Which is faster depends on the GPU and torch; it is chosen by measurement
    (``bench/gpu_run.sh``), and the default ``"auto"`` is unmeasured. The environment variable
    ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1`` is torch's own, process-wide way to keep dense SDPA
    off cuDNN.
    """
    if plan.device.type != "cuda" or plan.attention_backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    others = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    cudnn = getattr(SDPBackend, "CUDNN_ATTENTION", None)
    with contextlib.ExitStack() as stack:
        if plan.attention_backend == "flash":
            stack.enter_context(sdpa_kernel(others))
            stack.enter_context(_varlen_without_cudnn())
        elif cudnn is not None:
            if "set_priority" in inspect.signature(sdpa_kernel).parameters:
                stack.enter_context(sdpa_kernel([cudnn, *others], set_priority=True))
            else:
                stack.enter_context(sdpa_kernel([cudnn, *others]))
        yield


@contextlib.contextmanager
def _varlen_without_cudnn() -> Iterator[None]:
    # torch 2.14 decides per call in a private helper that forward and backward both consult;
    # replacing it keeps the two on one backend. Older torch has no such routing.
    try:
        from torch.nn.attention import varlen
    except ImportError:
        yield
        return
    original = getattr(varlen, "_should_use_cudnn", None)
    if original is None:
        yield
        return
    varlen._should_use_cudnn = lambda device_index: False
    try:
        yield
    finally:
        varlen._should_use_cudnn = original


__all__ = [
    "ATTENTIONS",
    "ATTENTION_BACKENDS",
    "ExecutionPlan",
    "Hardware",
    "attention_backend",
    "choose_plan",
    "execution_plan",
    "probe_hardware",
]
