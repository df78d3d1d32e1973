"""The Geneformer encoder: transformers parity, packed == padded, layers, MLM head, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import scgeneformer as sgf
from scgeneformer.data import pack_tokens
from scgeneformer.model import PRESETS, Geneformer, GeneformerConfig

from .conftest import small_vocab

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 48,
}


def tiny_vocab(**kwargs) -> sgf.Vocabulary:
    return small_vocab(60, cls=True, max_length=48, **kwargs)


def tiny_hf_mlm(vocab: sgf.Vocabulary, seed: int = 0, cls=None):
    """A random-weight transformers BERT (ReLU, eager attention) with no trivial parameters."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_act="relu",
        layer_norm_eps=1e-12,
        attn_implementation="eager",
        **TINY,
    )
    model = (cls or transformers.BertForMaskedLM)(config)
    with torch.no_grad():
        # Non-zero biases and non-unit LayerNorms, so every parameter matters to the output.
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "weight" in name else 0.2))
    return model.eval()


def mixed_batch(vocab: sgf.Vocabulary, lengths=(17, 5, 40, 1, 29), width=None, seed=0):
    """Right-padded rows of random gene tokens framed by <cls>/<eos>, and their mask."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    genes = vocab.gene_token_ids
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.choice(genes, n, replace=False)
        ids[row, 0], ids[row, n - 1] = vocab.cls_id, vocab.eos_id
    ids = torch.from_numpy(ids)
    return ids, torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    vocab = tiny_vocab()
    hf = tiny_hf_mlm(vocab)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, Geneformer.from_pretrained(folder, vocab), vocab


def test_every_layer_and_mlm_logits_match_transformers(hf_and_ours):
    hf, model, vocab = hf_and_ours
    ids, mask = mixed_batch(vocab)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), output_hidden_states=True)
        for layer, expected in enumerate(ref.hidden_states):
            got = model.hidden_states(ids, mask, layer=layer)
            assert rel_err(got[mask], expected[mask]) < 1e-5, layer
        last = model.hidden_states(ids, mask, layer=-1)
        logits = model.mlm_logits(last, mask)
        # The head runs only on the selected rows; index positions give the same rows.
        assert logits.shape == (int(mask.sum()), len(vocab))
        assert rel_err(logits, ref.logits[mask]) < 1e-5
        flat_index = torch.flatten(mask).nonzero().squeeze(1)
        torch.testing.assert_close(model.mlm_logits(last, flat_index), logits)
        torch.testing.assert_close(model(ids, mask, mlm_positions=mask), logits)


def test_default_mask_hides_pad_tokens_and_unpadded_batches_run_unmasked(hf_and_ours):
    _, model, vocab = hf_and_ours
    ids, mask = mixed_batch(vocab)
    with torch.no_grad():
        torch.testing.assert_close(
            model.hidden_states(ids)[mask], model.hidden_states(ids, mask)[mask]
        )
        full, _ = mixed_batch(vocab, lengths=(9, 9, 9))
        torch.testing.assert_close(
            model.hidden_states(full), model.hidden_states(full, torch.ones_like(full))
        )


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
def test_packed_path_equals_padded_path(hf_and_ours, layer):
    _, model, vocab = hf_and_ours
    lengths = (17, 5, 40, 1, 29)
    ids, mask = mixed_batch(vocab, lengths)
    flat, cu_seqlens, max_seqlen = pack_tokens(ids, lengths)
    assert cu_seqlens.dtype == torch.int32 and max_seqlen == 40
    with torch.no_grad():
        padded = model.hidden_states(ids, mask, layer=layer)
        packed = model.hidden_states_packed(flat, cu_seqlens, max_seqlen, layer=layer)
        # A generous max_seqlen (as used to avoid recompiles) changes nothing.
        loose = model.hidden_states_packed(flat, cu_seqlens, model.max_length, layer=layer)
    assert packed.shape == (sum(lengths), model.hidden_size)
    torch.testing.assert_close(packed, padded[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loose, packed, rtol=1e-5, atol=1e-5)


def test_packed_positions_restart_per_cell(hf_and_ours):
    _, model, vocab = hf_and_ours
    one, _ = mixed_batch(vocab, lengths=(12,), seed=3)
    alone = model.hidden_states(one, layer=-1)[0]
    with torch.no_grad():
        # The same cell behind another cell must give the same states as on its own.
        other, _ = mixed_batch(vocab, lengths=(7,), seed=4)
        flat = torch.cat([other[0], one[0]])
        cu = torch.tensor([0, 7, 19], dtype=torch.int32)
        packed = model.hidden_states_packed(flat, cu, 12, layer=-1)
    torch.testing.assert_close(packed[7:], alone, rtol=1e-5, atol=1e-5)


def test_forward_stops_at_the_layer_read(hf_and_ours, monkeypatch):
    _, model, vocab = hf_and_ours
    ids, mask = mixed_batch(vocab)
    ran = []
    for i, layer in enumerate(model.bert.encoder.layer):
        monkeypatch.setattr(
            layer, "forward", lambda *a, i=i, f=layer.forward: ran.append(i) or f(*a)
        )
    model.hidden_states(ids, mask, layer=1)
    flat, cu, longest = pack_tokens(ids, mask.sum(1).numpy())
    model.hidden_states_packed(flat, cu, longest, layer=1)
    assert ran == [0, 0]


def test_training_step_backpropagates_through_both_paths():
    vocab = tiny_vocab()
    model = Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    assert model.training and model.preset is None
    ids, mask = mixed_batch(vocab)
    flat, cu, longest = pack_tokens(ids, mask.sum(1).numpy())
    targets = flat[::3]
    positions = torch.arange(0, len(flat), 3)
    for logits in (
        model(ids, mask, mlm_positions=mask.flatten().nonzero().squeeze(1)[::3]),
        model(flat, mlm_positions=positions, cu_seqlens=cu, max_seqlen=longest),
    ):
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, targets).backward()
        assert torch.isfinite(model.bert.embeddings.word_embeddings.weight.grad).all()
        assert model.cls.predictions.bias.grad.abs().sum() > 0
        assert model.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_from_config_presets_and_bert_initialisation():
    vocab = tiny_vocab()
    for config in PRESETS.values():
        assert config.head_dim == 64 and config.hidden_act == "relu"
        assert config.layer_norm_eps == 1e-12 and config.hidden_dropout_prob == 0.02
    model = Geneformer.from_config("v1-10m", vocab, random_state=1, max_position_embeddings=64)
    assert model.config.vocab_size == len(vocab) and model.num_layers == 6
    assert model.hidden_size == 256 and model.vocab is vocab and model.preset is None
    exact = Geneformer.from_config("V1-10M", small_vocab(60, cls=True), random_state=1)
    assert exact.preset == "V1-10M" and exact.max_length == 2048
    state = model.state_dict()
    q = state["bert.encoder.layer.0.attention.self.query.weight"]
    assert abs(float(q.std()) - 0.02) < 2e-3
    assert state["bert.encoder.layer.0.attention.self.query.bias"].abs().sum() == 0
    assert (state["bert.embeddings.LayerNorm.weight"] == 1).all()
    assert state["bert.embeddings.word_embeddings.weight"][0].abs().sum() == 0
    assert state["cls.predictions.bias"].abs().sum() == 0
    again = Geneformer.from_config("v1-10m", vocab, random_state=1, max_position_embeddings=64)
    torch.testing.assert_close(again.state_dict(), state)
    custom = GeneformerConfig(3, 48, 4, 96, 64, vocab_size=1)
    assert Geneformer.from_config(custom, vocab).config.vocab_size == len(vocab)


def test_config_round_trips_through_hf_dict():
    config = PRESETS["V2-316M"]
    hf = transformers.BertConfig(**config.to_hf_dict())
    assert GeneformerConfig.from_hf_dict(hf.to_dict()) == config
    assert config.to_hf_dict()["architectures"] == ["BertForMaskedLM"]
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        GeneformerConfig.from_hf_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        GeneformerConfig(2, 30, 4, 64, 64, vocab_size=10)
    with pytest.raises(TypeError, match="Unknown config field"):
        config.replace(n_layers=3)


def test_bad_input_gets_clear_errors(hf_and_ours):
    _, model, vocab = hf_and_ours
    ids, mask = mixed_batch(vocab)
    too_big = ids.clone()
    too_big[0, 1] = len(vocab) + 5
    with pytest.raises(ValueError, match=r"outside the model's vocabulary .*\[69\]"):
        model.hidden_states(too_big, mask)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model.hidden_states_packed(torch.tensor([4, -1]), torch.tensor([0, 2]), 2)
    long_ids = torch.full((1, 49), 5)
    with pytest.raises(
        ValueError, match=r"49 tokens are longer than the model's position table \(48\)"
    ):
        model.hidden_states(long_ids)
    with pytest.raises(ValueError, match="longer than the model's position table"):
        model.hidden_states_packed(long_ids[0], torch.tensor([0, 49]), 49)
    with pytest.raises(
        ValueError,
        match=r"cu_seqlens (must be non-decreasing offsets|\(2\) must equal the number of tokens)",
    ):
        model.hidden_states_packed(torch.tensor([4, 5, 6]), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="max_seqlen=1 is less than the longest cell"):
        model.hidden_states_packed(torch.tensor([4, 5, 6]), torch.tensor([0, 2, 3]), 1)
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 2\]"):
        model.hidden_states(ids, mask, layer=3)
    with pytest.raises(ValueError, match="2-d integer array"):
        model.hidden_states(ids.float())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.hidden_states(ids, mask[:, :3])
    with pytest.raises(ValueError, match="boolean positions mask must have shape"):
        model.mlm_logits(model.hidden_states(ids, mask), mask[:2])
    with pytest.raises(ValueError, match="tokenizes cells to 4096 tokens"):
        Geneformer.from_config("V1-10M", small_vocab(10, max_length=4096))


def test_refuses_tokens_of_another_vocabulary(hf_and_ours):
    _, model, vocab = hf_and_ours
    model.check_tokens_vocabulary(vocab.sha256)
    other = small_vocab(60, cls=True, seed=9, name="other")
    with pytest.raises(
        ValueError, match=r"vocabulary 'other' \(sha256 .*model uses vocabulary 'custom'"
    ):
        model.check_tokens_vocabulary(other.sha256, other.name)
