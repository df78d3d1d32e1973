"""The environment report users paste into bug reports: versions, GPUs, the plans tools run."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

_DEPENDENCIES = (
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "anndata",
    "scanpy",
    "numba",
    "safetensors",
    "h5py",
    "seaborn",
    "tqdm",
    "igraph",
    "transformers",
    "pyarrow",
)
_ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "TORCH_CUDNN_SDPA_DEPRIORITIZED", "LOCAL_RANK")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k:<{width}}  {v}" for k, v in rows]


def environment_report(device: str | None = None) -> str:
    """Describe this environment as text: versions, torch's CUDA, GPUs, each tool's plan.

    Parameters
    ----------
    device
        Plan for this device instead of ``sgf.settings.device``.

    Examples
    --------
    >>> report = environment_report("cpu")
    >>> report.splitlines()[0].startswith("scgeneformer ")
    True
    >>> "padded attention, float32 on CPU" in report
    True
    """
    import torch

    from ._plan import execution_plan, probe_hardware
    from ._settings import settings
    from ._version import __version__
    from .model._config import PRESETS

    lines = [
        f"scgeneformer {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        "",
        "dependencies",
        *_rows([(name, _version(name)) for name in _DEPENDENCIES]),
        "",
        "torch",
    ]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    resolved = settings.resolve_device(device)
    hardware = probe_hardware(resolved)
    torch_rows = [
        ("version", torch.__version__),
        ("CUDA build", torch.version.cuda or "none (CPU build)"),
        ("cuDNN", str(cudnn) if cudnn else "none"),
        ("varlen_attn", "yes" if hardware.has_varlen else "no (needs torch 2.10+)"),
        ("nested tensors", "with length hints" if hardware.has_nested else "without length hints"),
    ]
    lines += _rows(torch_rows)
    lines += ["", "GPUs"]
    if torch.cuda.is_available():
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                (
                    f"cuda:{i}",
                    f"{props.name}, capability {props.major}.{props.minor}, "
                    f"{props.total_memory / 2**30:.1f} GiB",
                )
            )
        lines += _rows(gpus)
    else:
        lines.append("  none (torch.cuda.is_available() is False)")
    lines += ["", "settings"]
    lines += _rows(
        [
            (name, repr(getattr(settings, name)))
            for name in ("device", "dtype", "attention", "compile", "attention_backend")
        ]
        + [("token_budget", f"{settings.token_budget:,}")]
    )
    set_variables = [(k, os.environ[k]) for k in _ENVIRONMENT if k in os.environ]
    if set_variables:
        lines += ["", "environment variables", *_rows(set_variables)]
    dropout = PRESETS["V1-10M"].attention_probs_dropout_prob
    plans = [
        ("embed, in_silico_*, predict", execution_plan(resolved, log=False)),
        (
            f"finetune, pretrain (attention dropout {dropout})",
            execution_plan(resolved, training=True, attention_dropout=dropout, log=False),
        ),
        (
            "finetune, pretrain (no attention dropout)",
            execution_plan(resolved, training=True, log=False),
        ),
    ]
    lines += ["", f"execution plans on {resolved}"]
    lines += _rows([(tool, plan.describe()) for tool, plan in plans])
    return "\n".join(lines)


def show_versions(device: str | None = None) -> None:
    """Print :func:`environment_report`: paste it into bug reports.

    Examples
    --------
    >>> import scgeneformer as sgf
    >>> sgf.show_versions()  # doctest: +SKIP
    """
    print(environment_report(device), file=sys.stdout)
