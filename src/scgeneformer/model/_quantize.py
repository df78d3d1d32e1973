"""4-bit and 8-bit frozen bases for LoRA (QLoRA, Dettmers et al. 2023), through bitsandbytes.

The Linear layers of the transformer layers are replaced by bitsandbytes' ``Linear4bit``
(NF4, 16-bit compute) or ``Linear8bitLt`` (LLM.int8()); the weights are quantized when the
layers move to the GPU. Embeddings, LayerNorms and the heads stay in float32. bitsandbytes'
kernels need CUDA, so a CPU run is refused before any work. Imported only when asked for.

This path is written against bitsandbytes 0.43+ and peft's LoRA layers for it; the test suite
runs on CPUs and only checks the refusals.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZE = ("4bit", "8bit")
_PIP = "pip install 'scgeneformer[quantize]'"


def require_bitsandbytes(quantize: str) -> Any:
    """Import ``bitsandbytes``, or raise an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"quantize={quantize!r} needs bitsandbytes: {_PIP}.") from err
    return bitsandbytes


def check_quantize(quantize: str | None, device: torch.device, adapter: object | None) -> None:
    """Refuse a quantization that cannot run here, before any work.

    Examples
    --------
    >>> check_quantize(None, torch.device("cpu"), None)
    >>> check_quantize("4bit", torch.device("cpu"), "lora")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: quantize='4bit' needs a CUDA GPU: ... this run's device is cpu. ...
    """
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or one of {list(QUANTIZE)}, got {quantize!r}.")
    if adapter is None:
        raise ValueError(
            f"quantize={quantize!r} quantizes the frozen base under a LoRA adapter, and "
            "quantized weights themselves cannot be trained; pass adapter='lora' too."
        )
    if device.type != "cuda":
        raise ValueError(
            f"quantize={quantize!r} needs a CUDA GPU: bitsandbytes' 4-bit and 8-bit kernels "
            f"run only there, and this run's device is {device}. Leave quantize=None on the "
            "CPU (a LoRA adapter trains there in float32)."
        )
    require_bitsandbytes(quantize)


def _quantized(bnb: Any, linear: nn.Linear, quantize: str) -> nn.Module:
    """Return a bitsandbytes layer holding ``linear``'s weights (quantized on the move to CUDA)."""
    n_in, n_out = linear.in_features, linear.out_features
    weight = linear.weight.data
    if quantize == "4bit":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        layer = bnb.nn.Linear4bit(
            n_in, n_out, bias=linear.bias is not None, compute_dtype=compute, quant_type="nf4"
        )
        # The layer's own (empty) parameter carries the quantization settings; the new one
        # takes them over, as transformers' replace_with_bnb_linear does.
        settings = dict(layer.weight.__dict__)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **settings)
    else:
        # has_fp16_weights=False keeps only the int8 weights; 6.0 is LLM.int8()'s outlier
        # threshold, the value transformers' BitsAndBytesConfig uses.
        layer = bnb.nn.Linear8bitLt(
            n_in, n_out, bias=linear.bias is not None, has_fp16_weights=False, threshold=6.0
        )
        settings = dict(layer.weight.__dict__)
        settings.pop("SCB", None)  # the scales are computed when the weights are quantized
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, **settings)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_linears(module: nn.Module, quantize: str, device: torch.device) -> None:
    """Replace every plain ``nn.Linear`` inside ``module`` by a quantized one on ``device``."""
    if device.type != "cuda":
        raise ValueError(f"quantize={quantize!r} needs a CUDA device, got {device}.")
    bnb = require_bitsandbytes(quantize)
    for name, sub in list(module.named_modules()):
        if type(sub) is not nn.Linear:
            continue
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, _quantized(bnb, sub, quantize).to(device))
