"""The Geneformer model: a BERT encoder over rank-ordered gene tokens, with its vocabulary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._hub import HubOptions, hub_folder, is_repo_id
from .._plan import packed_attention_for
from ..vocab import Vocabulary
from . import _hf_folder as ckpt
from ._attention import PackedAttention, PaddedAttention, key_padding_bias, packed_positions
from ._config import PRESETS, GeneformerConfig, preset
from ._encoder import Bert, MLMHead, dropout_active, init_weights
from ._lora import lora_layers

TensorLike = torch.Tensor | np.ndarray


def _compute_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    """Return the dtype attention sees: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weights


class Geneformer(nn.Module):
    """Geneformer: the BERT encoder of Theodoris et al. (2023) and its gene vocabulary.

    The maths and parameter names are those of ``transformers.BertForMaskedLM`` (post-LN,
    absolute positions, token type 0, MLM head tied to the word embeddings), so official
    checkpoints load one to one and saved models load in transformers.

    Two input layouts share the weights:

    - padded batches ``(cells, length)`` with a key-padding mask (:meth:`hidden_states`);
    - packed cells, concatenated without padding, with int32 offsets ``cu_seqlens``
      (:meth:`hidden_states_packed`); the execution plan picks the kernel (flash
      ``varlen_attn`` on capability 8.0+ in 16-bit, nested jagged SDPA, or a padded
      stand-in). Positions restart at 0 in every cell.

    Both stop at the layer read; later layers never run. The MLM head
    (:meth:`mlm_logits`) only runs on the positions asked for.

    Build one with :meth:`from_config` (fresh, random weights) or :meth:`from_pretrained`
    (a checkpoint folder); save with :meth:`save`.

    Parameters
    ----------
    config
        Sizes; ``config.vocab_size`` must equal ``len(vocab)``.
    vocab
        The vocabulary the model's tokens come from; kept as :attr:`vocab`.
    mlm_head
        Whether to build the masked-gene prediction head.
    preset
        Name of the preset the config came from, if any (recorded on save).

    Attributes
    ----------
    config
        The :class:`GeneformerConfig`.
    vocab
        The :class:`~scgeneformer.Vocabulary`.
    preset
        Preset name or None.
    training_args
        JSON-serialisable dict saved with the model (set by training code).
    source_folder
        The folder the model was loaded from (None for one built with :meth:`from_config`);
        a LoRA adapter trained on it records it to find its base again.
    bert, cls
        The encoder and the MLM head (``cls`` is None without a head), named as in
        transformers.

    Examples
    --------
    >>> import torch, scgeneformer as sgf
    >>> genes = [f"ENSG{i:011d}" for i in range(50)]
    >>> vocab = sgf.Vocabulary({g: i + 2 for i, g in enumerate(genes)}, dict.fromkeys(genes, 1.0))
    >>> model = sgf.Geneformer.from_config("V1-10M", vocab, num_hidden_layers=2, random_state=0)
    >>> ids = torch.tensor([[5, 9, 3, 0], [7, 2, 8, 11]])  # 0 = <pad>
    >>> model.eval().hidden_states(ids, layer=-1).shape
    torch.Size([2, 4, 256])
    """

    def __init__(
        self,
        config: GeneformerConfig,
        vocab: Vocabulary,
        *,
        mlm_head: bool = True,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        if config.vocab_size != len(vocab):
            raise ValueError(
                f"config.vocab_size ({config.vocab_size:,}) differs from the vocabulary "
                f"{vocab.name!r} ({len(vocab):,} token ids)."
            )
        self.config = config
        self.vocab = vocab
        self.preset = preset
        self.training_args: dict[str, Any] = {}
        self.source_folder: Path | None = None
        self.bert = Bert(config)
        self.cls = MLMHead(config) if mlm_head else None
        init_weights(self, config.initializer_range, None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        preset_or_config: str | GeneformerConfig,
        vocab: Vocabulary,
        *,
        random_state: int | None = None,
        **overrides: Any,
    ) -> Geneformer:
        """Build a fresh, randomly initialised model (BERT initialisation) for pretraining.

        Parameters
        ----------
        preset_or_config
            A preset name (``"V1-10M"``, ``"V2-104M"``, ``"V2-316M"``; see
            :data:`~scgeneformer.model.PRESETS`) or a :class:`GeneformerConfig`.
        vocab
            The vocabulary; it sets ``vocab_size``.
        random_state
            Seed for the initial weights (default: torch's global generator).
        **overrides
            Config fields to change, e.g. ``num_hidden_layers=4``.

        Returns
        -------
        The model, in training mode.

        Examples
        --------
        >>> model = sgf.Geneformer.from_config("V2-104M", vocab)  # doctest: +SKIP
        """
        if isinstance(preset_or_config, GeneformerConfig):
            base, name = preset_or_config, None
        else:
            base = preset(preset_or_config)
            name = next(k for k, v in PRESETS.items() if v is base)
        if "vocab_size" in overrides and overrides["vocab_size"] != len(vocab):
            raise ValueError(
                f"vocab_size={overrides['vocab_size']} contradicts the vocabulary {vocab.name!r} "
                f"({len(vocab):,} token ids); leave vocab_size out."
            )
        config = base.replace(**{**overrides, "vocab_size": len(vocab)})
        if name is not None and config.replace(vocab_size=base.vocab_size) != base:
            name = None  # no longer the preset's architecture
        vocab = vocab.fitted_to(
            config.max_position_embeddings,
            fix=f"Build the vocabulary with max_length<={config.max_position_embeddings} or "
            f"pass max_position_embeddings={vocab.max_length}.",
        )
        with torch.device("meta"):
            model = cls(config, vocab, preset=name)
        model.to_empty(device="cpu")
        generator = None if random_state is None else torch.Generator().manual_seed(random_state)
        init_weights(model, config.initializer_range, generator)
        return model

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        vocab: Vocabulary | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> Geneformer:
        """Load a checkpoint folder in the Hugging Face layout, local or from the hub.

        Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, only
        through ``torch.load(weights_only=True)``). Official Geneformer folders and
        fine-tuned ``BertForSequenceClassification`` / ``BertForTokenClassification`` folders
        load too; from the latter only the encoder is taken (the pooler and classifier are
        ignored) and the model has no MLM head (:attr:`has_mlm_head` is False).

        Parameters
        ----------
        folder
            The checkpoint folder.
        vocab
            The vocabulary. By default it is read from the folder: ``vocab.json`` (written by
            :meth:`save`), else the official ``token_dictionary*.pkl`` and
            ``gene_median_dictionary*.pkl`` (and ``ensembl_mapping_dict*.pkl`` if present).
            The official model folders hold none: pass the vocabulary of their generation.
        subfolder
            The model folder inside ``folder`` or inside a hub repository (e.g.
            ``"Geneformer-V2-104M"``).
        revision, cache_dir, local_files_only
            With a hub repository id as ``folder`` (e.g. the official
            ``"ctheodoris/Geneformer"``), as in ``huggingface_hub.snapshot_download`` (``pip
            install 'scgeneformer[hub]'``): a branch, tag or commit, the cache folder, and
            offline use of the cache only (also ``HF_HUB_OFFLINE=1``). Only ``subfolder``'s
            files are fetched. A local path is never looked up on the hub.

        Returns
        -------
        The model, in float32 on the CPU, in evaluation mode.

        Examples
        --------
        >>> model = sgf.Geneformer.from_pretrained("Geneformer-V2-104M")  # doctest: +SKIP
        >>> model = sgf.Geneformer.from_pretrained(
        ...     "ctheodoris/Geneformer", vocab, subfolder="Geneformer-V2-104M"
        ... )  # doctest: +SKIP
        """
        if is_repo_id(folder):
            options = HubOptions(revision, cache_dir, local_files_only)
            folder = hub_folder(str(folder), subfolder, options)
        elif subfolder is not None:
            folder = Path(folder) / subfolder
        return cls._load_folder(folder, vocab)[0]

    @classmethod
    def _load_folder(
        cls, folder: str | os.PathLike, vocab: Vocabulary | None
    ) -> tuple[Geneformer, dict[str, torch.Tensor], Path]:
        """Load the encoder of a folder; also return the raw weights (heads too) and their file.

        Classifiers read their heads from the same raw weights, so a folder's weights file is
        read once (1.2 GB for V2-316M).
        """
        folder = Path(folder)
        config, vocab, metadata, raw, weights_path = ckpt.read_folder(folder, vocab)
        with torch.device("meta"):
            model = cls(config, vocab, preset=metadata.get("preset"))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state, has_mlm_head = ckpt.match_state_dict(raw, expected, str(weights_path))
        if not has_mlm_head:
            model.cls = None
        model.load_state_dict(state, strict=True, assign=True)
        model.training_args = dict(metadata.get("training_args") or {})
        model.source_folder = folder.resolve()
        return model.float().eval(), raw, weights_path

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model as a Hugging Face style folder, atomically.

        Writes ``config.json`` (``BertForMaskedLM``, model_type ``bert``; ``BertModel``
        without an MLM head), ``model.safetensors`` (the tied decoder weight is left out, as
        transformers does), ``vocab.json`` and ``scgeneformer.json`` (vocabulary name and
        sha256, preset, package version, :attr:`training_args`). The folder loads with
        :meth:`from_pretrained` and with ``transformers.BertForMaskedLM.from_pretrained``.

        Parameters
        ----------
        folder
            Target folder; created, or updated in place when it exists.

        Returns
        -------
        The folder.

        Examples
        --------
        >>> model.save("my_model")  # doctest: +SKIP
        """
        if next(lora_layers(self), None) is not None:
            raise ValueError(
                "This encoder carries a LoRA classifier's adapters, and its folder would hold "
                "them under names nothing loads. Save the classifier (clf.save(folder)), or "
                "the merged encoder: clf.merge_adapter().encoder.save(folder)."
            )
        architecture = "BertForMaskedLM" if self.has_mlm_head else "BertModel"
        metadata = {
            "preset": self.preset,
            "has_mlm_head": self.has_mlm_head,
            "training_args": self.training_args,
        }
        return ckpt.write_checkpoint(
            folder,
            self.config.to_hf_dict(architecture=architecture),
            self.state_dict(),
            self.vocab,
            metadata,
        )

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of transformer layers."""
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states (the embedding dimension)."""
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input in tokens (the position table's size)."""
        return self.config.max_position_embeddings

    @property
    def has_mlm_head(self) -> bool:
        """Whether the masked-gene prediction head is present."""
        return self.cls is not None

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.bert.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point type of the weights."""
        return self.bert.embeddings.word_embeddings.weight.dtype

    def extra_repr(self) -> str:
        """Summarise sizes and vocabulary in the module's repr."""
        c = self.config
        return (
            f"preset={self.preset!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}, vocab={self.vocab.name!r} ({len(self.vocab):,}), "
            f"mlm_head={self.has_mlm_head}"
        )

    # ------------------------------------------------------------------ checks
    def check_tokens_vocabulary(self, sha256: str, name: str | None = None) -> None:
        """Refuse tokens made with another vocabulary than the model's.

        Parameters
        ----------
        sha256
            The vocabulary sha256 recorded with the tokens (e.g.
            ``adata.uns["geneformer"]["vocabulary_sha256"]``).
        name
            That vocabulary's name, for the message.

        Examples
        --------
        >>> model.check_tokens_vocabulary(model.vocab.sha256)  # same vocabulary: passes
        """
        if sha256 != self.vocab.sha256:
            theirs = f"{name!r} " if name else ""
            raise ValueError(
                f"These tokens were made with vocabulary {theirs}(sha256 {str(sha256)[:12]}…), "
                f"but the model uses vocabulary {self.vocab.name!r} (sha256 "
                f"{self.vocab.sha256[:12]}…). Tokenize again with model.vocab."
            )

    def _n_layers(self, layer: int) -> int:
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(
                f"layer must be in [{-(n + 1)}, {n}] for a {n}-layer model "
                f"(0 = embeddings, {n} or -1 = last layer), got {layer}."
            )
        return layer % (n + 1)

    def _token_tensor(self, tokens: TensorLike, ndim: int, what: str) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.ndim != ndim or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(
                f"{what} must be a {ndim}-d integer array, got shape {tuple(tokens.shape)} "
                f"of {tokens.dtype}."
            )
        return tokens.long()

    def check_token_ids(self, ids: torch.Tensor | np.ndarray, where: str | None = None) -> None:
        """Refuse token ids outside the vocabulary (:meth:`Vocabulary.check_tokens`)."""
        self.vocab.check_tokens(ids, where=where)

    def _check_length(self, length: int) -> None:
        if length > self.max_length:
            raise ValueError(
                f"Sequences of {length} tokens are longer than the model's position table "
                f"({self.max_length}); tokenize with max_length<={self.max_length}."
            )

    # ------------------------------------------------------------------ forward paths
    def _padded_inputs(
        self,
        input_ids: TensorLike,
        attention_mask: TensorLike | None,
        validate: bool,
        key_gate: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PaddedAttention]:
        ids = self._token_tensor(input_ids, 2, "input_ids")
        if attention_mask is None:
            keep = ids != self.config.pad_token_id
        else:
            keep = torch.as_tensor(attention_mask, device=ids.device).bool()
            if keep.shape != ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(keep.shape)}, input_ids {tuple(ids.shape)}."
                )
        if validate:
            self._check_length(ids.shape[1])
            self.check_token_ids(ids)
        bias = None if bool(keep.all()) else key_padding_bias(keep, self.dtype)
        if key_gate is not None:
            if key_gate.shape != ids.shape:
                raise ValueError(
                    f"key_gate has shape {tuple(key_gate.shape)}, input_ids {tuple(ids.shape)}."
                )
            gate = key_gate.to(self.dtype)[:, None, None, :]
            bias = gate if bias is None else bias + gate
        return ids, PaddedAttention(bias)

    def hidden_states(
        self,
        input_ids: TensorLike,
        attention_mask: TensorLike | None = None,
        *,
        layer: int = -1,
        validate: bool = True,
        key_gate: torch.Tensor | None = None,
        position_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of a padded batch at one layer; later layers never run.

        Parameters
        ----------
        input_ids
            Token ids ``(cells, length)``, e.g. ``adata.obsm["geneformer_tokens"]``.
        attention_mask
            1/True for real tokens, 0/False for padding. By default every ``<pad>`` (id 0)
            is masked; a batch without padding then runs unmasked attention.
        layer
            Index into transformers' ``hidden_states``: 0 is the embeddings' output, ``k``
            the output of layer ``k``; negative values count from the end (-1 = last layer).
        validate
            Check ids and length (one device synchronisation). Leave it on unless the input
            was checked before.
        key_gate
            Log-gates ``(cells, length)`` added to every query's attention logits for each
            key (0: the token as it is; very negative: other tokens no longer see it). It may
            require grad: the first-order screen differentiates through it.
        position_offset
            Added to each token's position embedding, ``(cells, length, hidden_size)``: the
            first-order screen moves tokens part of the way toward the next position down
            (where a deletion before them puts them) and differentiates through it.

        Returns
        -------
        ``(cells, length, hidden_size)``; rows at padding positions are meaningless.

        Examples
        --------
        >>> model.hidden_states(ids, layer=1).shape
        torch.Size([2, 4, 256])
        """
        n_layers = self._n_layers(layer)
        ids, attend = self._padded_inputs(input_ids, attention_mask, validate, key_gate)
        positions = torch.arange(ids.shape[1], device=ids.device)
        if position_offset is not None:
            if position_offset.shape != (*ids.shape, self.hidden_size):
                raise ValueError(
                    f"position_offset has shape {tuple(position_offset.shape)}, expected "
                    f"{(*ids.shape, self.hidden_size)} (input_ids and the hidden size)."
                )
            position_offset = position_offset.to(self.dtype)
        return self.bert(ids, positions, attend, n_layers, position_offset)

    def _packed_inputs(
        self,
        tokens: TensorLike,
        cu_seqlens: TensorLike,
        max_seqlen: int,
        validate: bool,
        attention: str | None,
    ) -> tuple[torch.Tensor, torch.Tensor, PackedAttention]:
        ids = self._token_tensor(tokens, 1, "tokens")
        if not isinstance(cu_seqlens, torch.Tensor) or not cu_seqlens.is_cuda:
            # Offsets still on the host cost nothing to check, so this guard always runs:
            # tokens past the last offset would leave varlen_attn's output unwritten (NaN).
            last = int(np.asarray(cu_seqlens)[-1]) if len(cu_seqlens) else -1
            if last != ids.numel():
                raise ValueError(
                    f"The last offset of cu_seqlens ({last}) must equal the number of tokens "
                    f"({ids.numel()})."
                )
        cu = torch.as_tensor(cu_seqlens, device=ids.device)
        if cu.dtype != torch.int32:
            cu = cu.to(torch.int32)
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "Packed batches must not be captured in a CUDA graph: their offsets change "
                "from batch to batch and a replay would reuse the captured ones. Compile "
                "without CUDA graphs (torch.compile's default mode, as sgf.settings.compile does)."
            )
        if validate:
            if (
                cu.ndim != 1
                or cu.numel() < 2
                or int(cu[0]) != 0
                or int(cu[-1]) != ids.numel()
                or bool((cu[1:] < cu[:-1]).any())
            ):
                raise ValueError(
                    "cu_seqlens must be non-decreasing offsets from 0 to the number of tokens "
                    f"({ids.numel()}), one more than the number of cells; got "
                    f"{cu.tolist()[:6]}{'…' if cu.numel() > 6 else ''}."
                )
            longest = int((cu[1:] - cu[:-1]).max())
            self._check_length(longest)
            if max_seqlen < longest:
                raise ValueError(
                    f"max_seqlen={max_seqlen} is less than the longest cell ({longest})."
                )
            self.check_token_ids(ids)
        if attention is None:
            attention = packed_attention_for(
                ids.device,
                _compute_dtype(ids.device, self.dtype),
                training=dropout_active(self),
                attention_dropout=self.config.attention_probs_dropout_prob,
            )
        cell, positions = packed_positions(cu, ids.numel())
        return ids, positions, PackedAttention(cu, max_seqlen, cell, positions, attention)

    def hidden_states_packed(
        self,
        tokens: TensorLike,
        cu_seqlens: TensorLike,
        max_seqlen: int,
        *,
        layer: int = -1,
        validate: bool = True,
        attention: str | None = None,
    ) -> torch.Tensor:
        """Hidden states of cells packed end to end, without padding.

        Parameters
        ----------
        tokens
            All cells' token ids concatenated ``(total_tokens,)``.
        cu_seqlens
            Offsets ``(cells + 1,)``, starting at 0 and ending at ``total_tokens``; made int32.
            See :func:`scgeneformer.data.pack_tokens`.
        max_seqlen
            The longest cell's length (an upper bound is fine: a fixed value such as
            :attr:`max_length` avoids recompiling under ``torch.compile``).
        layer
            As in :meth:`hidden_states`.
        validate
            Check ids, offsets and lengths (a few device synchronisations); pass False when
            compiling. Offsets given on the host are always checked against the tokens.
        attention
            The packed kernel, ``"varlen"``, ``"nested"`` or ``"padded"`` (a padded stand-in);
            default: the execution plan's for this device and (autocast) dtype.

        Returns
        -------
        ``(total_tokens, hidden_size)``, aligned with ``tokens``.

        Examples
        --------
        >>> flat = torch.tensor([5, 9, 3, 7, 2, 8, 11])
        >>> cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        >>> model.hidden_states_packed(flat, cu, 4, layer=-1).shape
        torch.Size([7, 256])
        """
        n_layers = self._n_layers(layer)
        ids, positions, attend = self._packed_inputs(
            tokens, cu_seqlens, max_seqlen, validate, attention
        )
        return self.bert(ids, positions, attend, n_layers)

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Masked-gene logits at the selected positions only.

        Parameters
        ----------
        hidden
            Last-layer hidden states, padded ``(cells, length, hidden)`` or packed
            ``(tokens, hidden)``.
        positions
            A boolean mask of ``hidden.shape[:-1]``, or integer indices into the flattened
            token axis (fixed-size, so better under ``torch.compile``).

        Returns
        -------
        ``(n_selected, vocab_size)``.

        Examples
        --------
        >>> h = model.hidden_states(ids)
        >>> model.mlm_logits(h, ids == 9).shape
        torch.Size([1, 52])
        """
        if self.cls is None:
            raise RuntimeError(
                "This model has no MLM head: it was loaded from a fine-tuned classification "
                "checkpoint. Load the pretrained (BertForMaskedLM) checkpoint for masked-gene "
                "predictions."
            )
        positions = torch.as_tensor(positions, device=hidden.device)
        if positions.dtype == torch.bool:
            if positions.shape != hidden.shape[:-1]:
                raise ValueError(
                    f"A boolean positions mask must have shape {tuple(hidden.shape[:-1])}, "
                    f"got {tuple(positions.shape)}."
                )
            selected = hidden[positions]
        else:
            selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.reshape(-1))
        return self.cls.predictions(selected, self.bert.embeddings.word_embeddings.weight)

    def forward(
        self,
        input_ids: TensorLike,
        attention_mask: TensorLike | None = None,
        mlm_positions: torch.Tensor | None = None,
        *,
        cu_seqlens: TensorLike | None = None,
        max_seqlen: int | None = None,
        validate: bool = True,
    ) -> torch.Tensor:
        """Run all layers; the training entry point.

        Parameters
        ----------
        input_ids
            Padded ``(cells, length)``, or packed ``(total_tokens,)`` when ``cu_seqlens`` is
            given.
        attention_mask
            Padded layout only; see :meth:`hidden_states`.
        mlm_positions
            Where to compute masked-gene logits (see :meth:`mlm_logits`); None returns the
            last hidden states instead.
        cu_seqlens, max_seqlen
            Packed layout: see :meth:`hidden_states_packed`.
        validate
            See :meth:`hidden_states`.

        Returns
        -------
        Logits ``(n_selected, vocab_size)`` when ``mlm_positions`` is given, else the last
        layer's hidden states.

        Examples
        --------
        >>> logits = model(ids, mlm_positions=ids == 9)
        >>> loss = torch.nn.functional.cross_entropy(logits, torch.tensor([9]))
        """
        if cu_seqlens is None:
            hidden = self.hidden_states(input_ids, attention_mask, validate=validate)
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask has no meaning for packed input (cu_seqlens).")
            if max_seqlen is None:
                raise ValueError("Packed input (cu_seqlens) needs max_seqlen.")
            hidden = self.hidden_states_packed(input_ids, cu_seqlens, max_seqlen, validate=validate)
        return hidden if mlm_positions is None else self.mlm_logits(hidden, mlm_positions)
