"""Model sizes: the official Geneformer presets and a small config with HF ``config.json`` I/O."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")

# transformers.BertConfig's defaults: a config.json that omits a key means these values there,
# so it must mean the same here for a checkpoint to behave identically in both.
_HF_BERT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class GeneformerConfig:
    """Sizes and constants of a Geneformer (BERT) encoder.

    Field names and meanings are those of ``transformers.BertConfig``; the defaults of the
    optional fields are Geneformer's (ReLU, dropout 0.02), not BERT's.

    Parameters
    ----------
    num_hidden_layers
        Transformer layers.
    hidden_size
        Width of the hidden states; a multiple of ``num_attention_heads``.
    num_attention_heads
        Attention heads per layer.
    intermediate_size
        Width of the feed-forward layer.
    max_position_embeddings
        Longest input, in tokens (the position table's size).
    vocab_size
        Number of token ids.
    hidden_act
        Activation of the feed-forward layer and the MLM head transform.
    hidden_dropout_prob, attention_probs_dropout_prob
        Dropout after embeddings / sub-layers, and on attention probabilities.
    layer_norm_eps
        LayerNorm epsilon.
    type_vocab_size
        Rows of the token-type table (only row 0 is used).
    pad_token_id
        Id of ``<pad>``; its embedding row gets no gradient.
    initializer_range
        Standard deviation of the random initialisation.

    Examples
    --------
    >>> from scgeneformer.model import GeneformerConfig, PRESETS
    >>> PRESETS["V1-10M"].head_dim
    64
    >>> cfg = GeneformerConfig(2, 64, 4, 128, 256, vocab_size=100)
    >>> GeneformerConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    True
    """

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    vocab_size: int
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "vocab_size",
            "type_vocab_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}.")
        if self.pad_token_id != 0:
            raise ValueError(f"pad_token_id must be 0 (<pad>), got {self.pad_token_id}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> GeneformerConfig:
        """Copy with some fields changed; unknown names raise a :class:`TypeError`.

        Examples
        --------
        >>> PRESETS["V1-10M"].replace(num_hidden_layers=2).num_hidden_layers
        2
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"Unknown config field(s) {unknown}; known: {sorted(known)}.")
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, *, architecture: str = "BertForMaskedLM") -> dict[str, Any]:
        """Build the ``config.json`` content that ``transformers`` reads as this model.

        Examples
        --------
        >>> PRESETS["V1-10M"].to_hf_dict()["model_type"]
        'bert'
        """
        return {
            "architectures": [architecture],
            "model_type": "bert",
            **dataclasses.asdict(self),
            "position_embedding_type": "absolute",
            "tie_word_embeddings": True,
            "is_decoder": False,
        }

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> GeneformerConfig:
        """Read a ``transformers`` BERT ``config.json`` dict.

        Absent keys take ``transformers.BertConfig``'s defaults, as they would there. Configs
        this encoder cannot reproduce exactly (another model type, relative positions, a
        decoder, untied output embeddings) raise a :class:`ValueError`.

        Examples
        --------
        >>> cfg = GeneformerConfig.from_hf_dict({"num_hidden_layers": 6, "hidden_act": "relu"})
        >>> cfg.hidden_size  # transformers' default
        768
        """
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"Expected a BERT config (model_type 'bert'), got {model_type!r}.")
        unsupported = {
            "position_embedding_type": ("absolute", data.get("position_embedding_type")),
            "is_decoder": (False, data.get("is_decoder")),
            "add_cross_attention": (False, data.get("add_cross_attention")),
            "tie_word_embeddings": (True, data.get("tie_word_embeddings")),
        }
        for key, (wanted, got) in unsupported.items():
            if got is not None and got != wanted:
                raise ValueError(f"config.json sets {key}={got!r}; only {wanted!r} is supported.")
        values = {key: data.get(key, default) for key, default in _HF_BERT_DEFAULTS.items()}
        return cls(**values)


PRESETS: dict[str, GeneformerConfig] = {
    # Official Geneformer configs (Hugging Face ctheodoris/Geneformer); all use head_dim 64.
    "V1-10M": GeneformerConfig(6, 256, 4, 512, 2048, vocab_size=25426),
    "V2-104M": GeneformerConfig(12, 768, 12, 3072, 4096, vocab_size=20275),
    "V2-316M": GeneformerConfig(18, 1152, 18, 4608, 4096, vocab_size=20275),
}
"""The official Geneformer sizes. ``vocab_size`` is the official vocabulary's; models built
with :meth:`Geneformer.from_config` take it from their own vocabulary instead."""


def preset(name: str) -> GeneformerConfig:
    """Look up a preset by name, ignoring case.

    Examples
    --------
    >>> preset("v2-104m").hidden_size
    768
    """
    for key, config in PRESETS.items():
        if key.lower() == str(name).lower():
            return config
    raise ValueError(f"Unknown preset {name!r}; choose one of {list(PRESETS)}.")
