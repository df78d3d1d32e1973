"""BERT encoder and MLM head with the maths and parameter names of ``BertForMaskedLM``.

Module attribute names follow transformers (``bert.encoder.layer.0.attention.self.query``,
``cls.predictions.transform.LayerNorm``, ...) so a state dict maps one to one onto official
checkpoints without any renaming. The decoder of the MLM head is not a module: it is the word
embedding matrix itself (tied, as in Geneformer), applied with ``cls.predictions.bias``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._config import GeneformerConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


# Inference turns dropout off per thread, not by flipping ``module.training``: a model shared
# by threads (one embedding while another trains, or two embedding) must not see another
# thread's mode, and ``.eval()``/``.train()`` change one flag that every thread reads.
_thread_state = threading.local()


@contextlib.contextmanager
def dropout_disabled() -> Iterator[None]:
    """Run forwards in this thread without any dropout, whatever ``module.training`` says.

    Nothing is changed on the modules, so other threads keep their own behaviour.

    Examples
    --------
    >>> layer = Dropout(0.5).train()
    >>> with dropout_disabled():
    ...     bool((layer(torch.ones(4)) == 1).all())
    True
    >>> layer.training
    True
    """
    before = getattr(_thread_state, "disabled", False)
    _thread_state.disabled = True
    try:
        yield
    finally:
        _thread_state.disabled = before


def dropout_active(module: nn.Module) -> bool:
    """Whether ``module`` drops out here: in training mode and outside :func:`dropout_disabled`."""
    return module.training and not getattr(_thread_state, "disabled", False)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that :func:`dropout_disabled` switches off for the calling thread only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop out ``x`` where :func:`dropout_active`; the identity otherwise."""
        return F.dropout(x, self.p, dropout_active(self), self.inplace)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
}


class Embeddings(nn.Module):
    """Word + position + token-type-0 embeddings, LayerNorm, dropout."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        position_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed token ids at the given positions (any leading shape).

        ``position_offset`` (broadcast to ``(*input_ids.shape, hidden)``) is added to the
        position embeddings.
        """
        # Same summation order as transformers, so fp32 results agree to the last bits.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)
        if position_offset is not None:
            x = x + position_offset
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Query, key and value projections followed by the given attention path."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Attention output ``(..., hidden)`` before the output projection."""
        projections = (self.query, self.key, self.value)
        if all(type(p) is nn.Linear for p in projections):
            # One fused matrix product instead of three: at hidden size 256 a single wide GEMM
            # uses the GPU far better, and concatenating the small weights costs next to nothing.
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = F.linear(x, weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
            q, k, v = qkv.unbind(-3)
        else:
            # LoRA adapters or quantized layers: their output is not their ``.weight``'s
            # product (peft's ``.weight`` is the frozen base's), so each runs as a module.
            q, k, v = (p(x).unflatten(-1, (self.num_heads, self.head_dim)) for p in projections)
        out = attend(q, k, v, self.dropout_p if dropout_active(self) else 0.0)
        return out.flatten(-2)


class SelfOutput(nn.Module):
    """Dense projection, dropout, residual, LayerNorm (post-LN)."""

    def __init__(self, config: GeneformerConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Project ``x``, add ``residual`` and normalise."""
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """Self-attention and its output block."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = SelfOutput(config, config.hidden_size)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Self-attention block with residual and LayerNorm."""
        return self.output(self.self(x, attend), x)


class Intermediate(nn.Module):
    """First feed-forward projection and its activation."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATION_FNS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project up and activate."""
        return self.act(self.dense(x))


class Layer(nn.Module):
    """One post-LN transformer layer."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = SelfOutput(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Attention block, then feed-forward block."""
        a = self.attention(x, attend)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    """The stack of layers."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


class Bert(nn.Module):
    """Embeddings and encoder (transformers' ``BertModel`` without the pooler)."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        n_layers: int,
        position_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states after ``n_layers`` layers (0: the embeddings); later layers never run."""
        x = self.embeddings(input_ids, positions, position_offset)
        for layer in self.encoder.layer[:n_layers]:
            x = layer(x, attend)
        return x


class PredictionHeadTransform(nn.Module):
    """Dense, activation, LayerNorm."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _ACTIVATION_FNS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform hidden states before the decoder."""
        return self.LayerNorm(self.act(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Transform and output bias; the decoder weight is the word embedding matrix."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for the rows of ``x``."""
        return F.linear(self.transform(x), word_embeddings, self.bias)


class MLMHead(nn.Module):
    """Container giving the ``cls.predictions.*`` parameter names."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(config)


def init_weights(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """BERT initialisation: normal(0, std) weights, zero biases, unit LayerNorm, zero pad row."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std, generator=generator)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
            if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
        elif isinstance(sub, LMPredictionHead):
            nn.init.zeros_(sub.bias)
