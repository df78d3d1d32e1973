"""HF-layout checkpoints: load transformers folders, save for transformers, refuse bad ones."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import scgeneformer as sgf
from scgeneformer.model import Geneformer

from .conftest import small_vocab
from .test_model import mixed_batch, rel_err, tiny_hf_mlm, tiny_vocab


class NotATensor:
    pass


@pytest.fixture(scope="module")
def vocab() -> sgf.Vocabulary:
    return tiny_vocab()


@pytest.fixture(scope="module")
def hf_model(vocab):
    return tiny_hf_mlm(vocab, seed=1)


@pytest.fixture
def hf_folder(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def assert_matches_hf(model: Geneformer, hf, vocab) -> None:
    ids, mask = mixed_batch(vocab, seed=5)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask.long(), output_hidden_states=True)
        for layer, expected in enumerate(ref.hidden_states):
            assert rel_err(model.hidden_states(ids, mask, layer=layer)[mask], expected[mask]) < 1e-5
        if hasattr(ref, "logits") and model.has_mlm_head:
            logits = model.mlm_logits(model.hidden_states(ids, mask), mask)
            assert rel_err(logits, ref.logits[mask]) < 1e-5


def test_loads_transformers_safetensors_and_vocab_json_beside_it(hf_folder, hf_model, vocab):
    vocab.save(hf_folder / "vocab.json")
    model = Geneformer.from_pretrained(hf_folder)
    assert model.vocab == vocab and model.has_mlm_head and not model.training
    assert model.dtype == torch.float32
    assert_matches_hf(model, hf_model, vocab)


def test_loads_old_style_pytorch_model_bin(tmp_path, hf_folder, hf_model, vocab):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    # transformers 5 writes only safetensors; write the .bin as older versions (and the official
    # V1 checkpoint) did, with the tied decoder copies and the position_ids buffer.
    state = dict(hf_model.state_dict())
    state["bert.embeddings.position_ids"] = torch.arange(48)[None]
    assert "cls.predictions.decoder.weight" in state
    torch.save(state, folder / "pytorch_model.bin")
    assert_matches_hf(Geneformer.from_pretrained(folder, vocab), hf_model, vocab)


def test_loads_sharded_checkpoints(tmp_path, hf_model, vocab):
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert_matches_hf(Geneformer.from_pretrained(folder, vocab), hf_model, vocab)
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[0].name}' is missing"):
        Geneformer.from_pretrained(folder, vocab)


def test_finds_the_official_pickled_dictionaries(hf_folder, hf_model, vocab):
    other = small_vocab(20, cls=True, seed=3)
    for suffix, v in (("_gc30M.pkl", other), ("_gc95M.pkl", vocab)):
        with open(hf_folder / f"token_dictionary{suffix}", "wb") as fh:
            pickle.dump({**v.special_tokens, **v.token_dict}, fh)
        medians = dict(zip(v.genes, v.median_by_token[v.gene_token_ids].tolist(), strict=True))
        with open(hf_folder / f"gene_median_dictionary{suffix}", "wb") as fh:
            pickle.dump(medians, fh)
    model = Geneformer.from_pretrained(hf_folder)
    assert model.vocab == vocab  # the pair whose size matches config.json


def test_saved_model_loads_in_transformers_with_same_outputs(tmp_path, vocab):
    model = Geneformer.from_config("V1-10M", vocab, random_state=2, max_position_embeddings=48)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.training_args = {"lr": 1e-3, "steps": 10}
    folder = model.save(tmp_path / "ours")
    hf, info = transformers.BertForMaskedLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_matches_hf(model, hf.eval(), vocab)

    again = Geneformer.from_pretrained(folder)
    torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert again.training_args == {"lr": 1e-3, "steps": 10}
    meta = json.loads((folder / "scgeneformer.json").read_text())
    assert meta["vocabulary_sha256"] == vocab.sha256
    assert meta["scgeneformer_version"] == sgf.__version__
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_save_is_atomic_and_keeps_other_files(tmp_path, vocab):
    model = Geneformer.from_config("V1-10M", vocab, random_state=0, max_position_embeddings=48)
    exact = Geneformer.from_config("V1-10M", small_vocab(60, cls=True), random_state=0)
    exact.save(tmp_path / "preset")
    assert Geneformer.from_pretrained(tmp_path / "preset").preset == "V1-10M"
    folder = tmp_path / "run"
    (folder / "checkpoint-10").mkdir(parents=True)
    model.save(folder)
    model.save(folder)  # overwriting an existing save is fine too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset", "run"]  # no temp folders
    assert (folder / "checkpoint-10").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-10",
        "config.json",
        "model.safetensors",
        "scgeneformer.json",
        "vocab.json",
    ]
    model.training_args = {"not json": object()}
    with pytest.raises(TypeError, match="training_args and history must be JSON-serialisable"):
        model.save(tmp_path / "bad")


@pytest.mark.parametrize(
    "head", ["BertForSequenceClassification", "BertForTokenClassification", "BertModel"]
)
def test_fine_tuned_folders_load_their_encoder_without_mlm_head(tmp_path, vocab, head):
    hf = tiny_hf_mlm(vocab, seed=4, cls=getattr(transformers, head))
    hf.save_pretrained(tmp_path / "ft")
    model = Geneformer.from_pretrained(tmp_path / "ft", vocab)
    assert not model.has_mlm_head
    encoder = hf.base_model.state_dict()
    ours = {k.removeprefix("bert."): v for k, v in model.state_dict().items()}
    for key, value in ours.items():
        torch.testing.assert_close(value, encoder[key], rtol=0, atol=0)
    assert_matches_hf(model, hf.base_model, vocab)
    with pytest.raises(RuntimeError, match="no MLM head"):
        model.mlm_logits(torch.zeros(2, 32), torch.tensor([0]))
    model.save(tmp_path / "resaved")
    assert not Geneformer.from_pretrained(tmp_path / "resaved").has_mlm_head


def test_vocabulary_of_another_size_is_refused(hf_folder):
    other = small_vocab(30, cls=True, name="small")
    with pytest.raises(ValueError, match=r"has 64 token ids but the vocabulary 'small' has 34"):
        Geneformer.from_pretrained(hf_folder, other)


def test_vocabulary_other_than_the_saved_one_is_refused(tmp_path, vocab):
    Geneformer.from_config("V1-10M", vocab, max_position_embeddings=48).save(tmp_path / "m")
    same_size = small_vocab(60, cls=True, seed=8, name="reseeded")
    with pytest.raises(ValueError, match=r"saved with vocabulary 'custom' .*not with 'reseeded'"):
        Geneformer.from_pretrained(tmp_path / "m", same_size)


def test_missing_and_unexpected_weights_are_named(hf_folder, vocab):
    path = hf_folder / "model.safetensors"
    state = load_file(path)
    del state["bert.encoder.layer.1.output.dense.weight"]
    state["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        Geneformer.from_pretrained(hf_folder, vocab)
    message = str(err.value)
    assert "missing weights: bert.encoder.layer.1.output.dense.weight" in message
    assert "unexpected weights: bert.encoder.layer.2.output.dense.weight" in message


def test_tensor_of_wrong_shape_is_named(hf_folder, vocab):
    path = hf_folder / "model.safetensors"
    state = load_file(path)
    state["bert.embeddings.position_embeddings.weight"] = torch.zeros(50, 32)
    save_file(state, path)
    with pytest.raises(
        ValueError, match=r"position_embeddings.weight \(50, 32\) \(config implies \(48, 32\)\)"
    ):
        Geneformer.from_pretrained(hf_folder, vocab)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_are_refused(tmp_path, hf_folder, hf_model, vocab, name):
    if name == "pytorch_model.bin":
        (hf_folder / "model.safetensors").unlink()
        torch.save(hf_model.state_dict(), hf_folder / name)
    data = (hf_folder / name).read_bytes()
    (hf_folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{name}' is damaged, incomplete"):
        Geneformer.from_pretrained(hf_folder, vocab)


def test_pickled_objects_in_bin_are_refused(hf_folder, vocab):
    (hf_folder / "model.safetensors").unlink()
    torch.save({"bert.x": NotATensor()}, hf_folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        Geneformer.from_pretrained(hf_folder, vocab)


def test_missing_pieces_get_clear_errors(tmp_path, hf_folder, vocab):
    with pytest.raises(FileNotFoundError, match=r"No vocabulary for the checkpoint .* vocab\.json"):
        Geneformer.from_pretrained(hf_folder)
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"No weights in .*the folder holds \['config\.json'\]"
    ):
        Geneformer.from_pretrained(hf_folder, vocab)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Geneformer.from_pretrained(tmp_path / "nowhere", vocab)
    (hf_folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json' is not readable JSON"):
        Geneformer.from_pretrained(hf_folder, vocab)
