"""The references the model benchmarks compare with, and a line about the machine they ran on.

Each job is compared with ``transformers``' ``BertForMaskedLM`` on the same weights, run two
ways: as Geneformer runs it (eager attention, fp32), and as a knowledgeable user would run it
today (``attn_implementation="sdpa"``, fp32, and with bfloat16 autocast where the device has
native bfloat16: CUDA of compute capability 8.0+, or a CPU with AVX512-BF16 / AMX). The
reference model is loaded before its timer starts, as ours is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Reference:
    label: str
    attention: str  # transformers' attn_implementation
    bf16: bool


GENEFORMER = Reference("transformers as Geneformer runs it: eager attention, fp32", "eager", False)
SDPA = Reference("transformers, SDPA attention, fp32", "sdpa", False)
SDPA_BF16 = Reference("transformers, SDPA attention, bf16 autocast", "sdpa", True)


def bf16_supported(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def references(device: torch.device) -> list[Reference]:
    """Geneformer's way, then SDPA, then SDPA with bf16 where the device supports it."""
    return [GENEFORMER, SDPA] + ([SDPA_BF16] if bf16_supported(device) else [])


def load(folder: str | Path, reference: Reference, device: torch.device, *, train: bool = False):
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(folder, attn_implementation=reference.attention)
    return model.to(device).train(train)


@contextlib.contextmanager
def precision(reference: Reference, device: torch.device) -> Iterator[None]:
    if reference.bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def machine() -> str:
    """The device, threads and the machine's load when the benchmark started."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    load1, load5, _ = os.getloadavg()
    return (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; shared with other users (load average {load1:.1f} / "
        f"{load5:.1f} over 1 / 5 min at start), so absolute times vary; ratios are of runs in "
        "this one process"
    )
