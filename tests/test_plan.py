"""The execution plan for every GPU a user may have (capability and torch version injected),
and every plan's path that runs on a CPU against the float32 padded path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import scgeneformer as sgf
from scgeneformer._plan import (
    Hardware,
    attention_backend,
    choose_plan,
    execution_plan,
    probe_hardware,
)
from scgeneformer.tl._inference import encode_cells

from .conftest import small_vocab
from .test_embed import counts_adata, tiny_model

CUDA = torch.device("cuda")


def gpu(capability, torch_version=(2, 13), varlen=True, nested=True, cudnn=91000):
    return Hardware(CUDA, "GPU", capability, torch_version, varlen, nested, cudnn)


# requested dtype -> (attention, dtype that runs), with varlen_attn in torch
AMPERE_AND_NEWER = {
    "auto": ("varlen", "bfloat16"),
    "bfloat16": ("varlen", "bfloat16"),
    "float16": ("varlen", "float16"),
    "float32": ("nested", "float32"),
}
VOLTA_TURING = {
    "auto": ("nested", "float16"),
    "bfloat16": ("nested", "float16"),
    "float16": ("nested", "float16"),
    "float32": ("nested", "float32"),
}
# (capability, torch has varlen) -> the table above
EXPECTED = {
    ((9, 0), True): AMPERE_AND_NEWER,
    ((8, 0), True): AMPERE_AND_NEWER,
    ((7, 5), True): VOLTA_TURING,
    ((7, 0), True): VOLTA_TURING,
}
for (cap, _), table in list(EXPECTED.items()):
    # torch 2.9: no varlen_attn; everything else as before, but never the varlen kernel.
    EXPECTED[(cap, False)] = {k: ("nested", d) for k, (_, d) in table.items()}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"sm{k[0][0]}{k[0][1]}-varlen{k[1]}")
@pytest.mark.parametrize("requested", ["auto", "bfloat16", "float16", "float32"])
@pytest.mark.parametrize("training", [False, True])
def test_plan_for_each_gpu_torch_and_dtype(key, requested, training):
    capability, varlen = key
    hardware = gpu(capability, (2, 13) if varlen else (2, 9), varlen=varlen)
    plan = choose_plan(hardware, dtype=requested, training=training, attention_dropout=0.0)
    assert (plan.attention, plan.dtype_name) == EXPECTED[key][requested]
    assert plan.requested_dtype == requested
    assert plan.loss_scaling == (training and plan.dtype == torch.float16)
    assert plan.packed
    if requested == "bfloat16" and capability < (8, 0):
        assert any("bfloat16 needs compute capability 8.0" in n for n in plan.notes)
    if plan.attention == "nested" and plan.dtype != torch.float32:
        reason = "capability 8.0" if capability < (8, 0) else "torch 2.10"
        assert any(reason in n for n in plan.notes), plan.notes


def test_varlen_is_not_chosen_for_training_with_attention_dropout():
    h100 = gpu((9, 0))
    plan = choose_plan(h100, training=True, attention_dropout=0.02)
    assert plan.attention == "nested"
    assert any("no attention dropout" in n for n in plan.notes)
    assert choose_plan(h100, training=True, attention_dropout=0.0).attention == "varlen"
    assert choose_plan(h100, training=False, attention_dropout=0.02).attention == "varlen"
    forced = choose_plan(h100, attention="varlen", training=True, attention_dropout=0.02)
    assert forced.attention == "varlen"
    assert any("skipped" in n for n in forced.notes)


def test_old_gpus_and_old_torch_fall_back_to_padded():
    kepler = choose_plan(gpu((3, 7)))
    assert (kepler.attention, kepler.dtype_name) == ("padded", "float32")
    assert any("5.0" in n for n in kepler.notes)
    # torch 2.4: nested tensors take no length hints (a sync per call), no varlen_attn
    old = choose_plan(gpu((8, 0), (2, 4), varlen=False, nested=False))
    assert (old.attention, old.dtype_name) == ("padded", "bfloat16")
    assert any("torch 2.10" in n for n in old.notes)
    pascal = choose_plan(gpu((6, 1)), dtype="float16")
    assert (pascal.attention, pascal.dtype_name) == ("nested", "float16")
    assert choose_plan(gpu((6, 1))).dtype_name == "float32"


def test_cpu_plans():
    cpu = Hardware(torch.device("cpu"), "CPU", None, (2, 13), True, True)
    assert (choose_plan(cpu).attention, choose_plan(cpu).dtype_name) == ("padded", "float32")
    assert choose_plan(cpu, dtype="bfloat16").dtype_name == "bfloat16"
    fp16 = choose_plan(cpu, dtype="float16", training=True)
    assert fp16.dtype_name == "float32" and not fp16.loss_scaling
    assert any("float16" in n for n in fp16.notes)
    assert choose_plan(cpu, attention="nested").attention == "nested"
    with pytest.raises(ValueError, match="CUDA only"):
        choose_plan(cpu, attention="varlen", dtype="bfloat16")


def test_forcing_a_path_that_cannot_run_names_the_reason():
    with pytest.raises(ValueError, match=r"capability 8\.0\+ \(this GPU: 7\.5\)"):
        choose_plan(gpu((7, 5)), attention="varlen", dtype="float16")
    with pytest.raises(ValueError, match=r"torch 2\.10"):
        choose_plan(gpu((9, 0), (2, 9), varlen=False), attention="varlen")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        choose_plan(gpu((9, 0)), attention="varlen", dtype="float32")
    with pytest.raises(ValueError, match="attention must be"):
        choose_plan(gpu((9, 0)), attention="flash")
    with pytest.raises(ValueError, match="dtype must be"):
        choose_plan(gpu((9, 0)), dtype="int8")
    with pytest.raises(ValueError, match="attention_backend"):
        choose_plan(gpu((9, 0)), attention_backend="triton")


def test_cudnn_routing_of_torch_214_is_noted():
    routed = choose_plan(gpu((9, 0), (2, 14), cudnn=91800))
    assert any("cuDNN" in n for n in routed.notes)
    assert not any("cuDNN" in n for n in choose_plan(gpu((8, 0), (2, 14), cudnn=91800)).notes)
    flash = choose_plan(gpu((9, 0), (2, 14), cudnn=91800), attention_backend="flash")
    assert not flash.notes and flash.attention_backend == "flash"


def test_plan_as_dict_is_plain_and_describes_itself():
    plan = choose_plan(gpu((7, 5)), dtype="bfloat16", training=True)
    d = plan.as_dict()
    assert (d["capability"], d["dtype"], d["requested_dtype"]) == ("7.5", "float16", "bfloat16")
    assert d["loss_scaling"] is True
    assert all(isinstance(v, str | bool | list) for v in d.values())
    assert "nested attention, float16, GradScaler" in plan.describe()


def test_probe_reads_this_machine():
    hardware = probe_hardware("cpu")
    assert hardware.capability is None
    assert hardware.torch_version == tuple(int(x) for x in torch.__version__.split(".")[:2])
    import importlib.util

    varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    assert hardware.has_varlen == varlen


# torch 2.4 (the oldest supported) has no nested tensors with length hints: "nested" is refused.
NESTED_HERE = probe_hardware("cpu").has_nested
needs_nested = pytest.mark.skipif(
    not NESTED_HERE, reason="this torch has no nested jagged tensors with length hints (2.5+)"
)


def test_nested_attention_is_refused_in_words_where_torch_lacks_it(monkeypatch):
    monkeypatch.setattr(sgf.settings, "attention", "nested")
    if NESTED_HERE:
        assert execution_plan("cpu", "float32").attention == "nested"
    else:
        with pytest.raises(ValueError, match=r"attention='nested' cannot run here.*torch 2\.5\+"):
            execution_plan("cpu", "float32")


@needs_nested
def test_execution_plan_follows_settings_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(sgf.settings, "dtype", "bfloat16")
    monkeypatch.setattr(sgf.settings, "attention", "nested")
    with caplog.at_level(logging.INFO, logger="scgeneformer._plan"):
        first = execution_plan("cpu", training=True, attention_dropout=0.5)
        second = execution_plan("cpu", training=True, attention_dropout=0.5)
    assert first == second
    assert (first.attention, first.dtype_name) == ("nested", "bfloat16")
    assert execution_plan("cpu", "float32").dtype_name == "float32"  # argument beats setting
    logged = [r for r in caplog.records if "execution plan" in r.getMessage()]
    assert len(logged) == 1 and "nested attention, bfloat16" in logged[0].getMessage()


def test_settings_resolve_dtype_goes_through_the_plan():
    assert sgf.settings.resolve_dtype("float16", torch.device("cpu")) == torch.float32
    assert sgf.settings.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


# ---------------------------------------------------------------- every CPU path, same numbers
@pytest.fixture(scope="module")
def cells():
    vocab = small_vocab(30, cls=True, max_length=64)
    adata = counts_adata(vocab, n_cells=24, seed=3)
    sgf.pp.rank_tokenize(adata, vocab)
    model = tiny_model(vocab)
    return model, adata.obsm["geneformer_tokens"], adata.obs["geneformer_n_tokens"].to_numpy()


@pytest.mark.parametrize(
    ("attention", "dtype", "packed", "tolerance"),
    [
        ("padded", "float32", True, 1e-5),  # packed cells through the padded stand-in
        pytest.param("nested", "float32", None, 1e-5, marks=needs_nested),
        ("padded", "bfloat16", None, 3e-2),
        pytest.param("nested", "bfloat16", None, 3e-2, marks=needs_nested),
    ],
)
def test_every_cpu_path_gives_the_fp32_padded_embeddings(
    cells, monkeypatch, attention, dtype, packed, tolerance
):
    model, tokens, n = cells
    reference = encode_cells(
        model, tokens, n, emb_layer=-1, pooling="mean", plan=execution_plan("cpu", "float32")
    ).cells
    monkeypatch.setattr(sgf.settings, "attention", attention)
    plan = execution_plan("cpu", dtype)
    assert (plan.attention, plan.dtype_name) == (attention, dtype)
    out = encode_cells(
        model, tokens, n, emb_layer=-1, pooling="mean", plan=plan, packed=packed, token_budget=200
    ).cells
    error = np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert error.max() <= tolerance, error.max()
    if dtype == "float32":
        assert error.max() > 0 or attention == "padded"  # nested really ran another kernel


def test_tools_record_the_plan_that_ran(cells, monkeypatch):
    model, _, _ = cells
    adata = counts_adata(model.vocab, n_cells=12, seed=4)
    monkeypatch.setattr(sgf.settings, "dtype", "float16")  # no fast float16 on a CPU
    sgf.tl.embed(adata, model)
    recorded = adata.uns["X_geneformer"]
    assert recorded["dtype"] == "float32"
    assert recorded["execution_plan"]["requested_dtype"] == "float16"
    assert recorded["execution_plan"]["attention"] == "padded"
    assert recorded["execution_plan"]["notes"]


def test_flash_backend_keeps_sdpa_and_varlen_off_cudnn():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    plan = choose_plan(gpu((9, 0), (2, 14), cudnn=91800), attention_backend="flash")
    original = varlen._should_use_cudnn
    with attention_backend(plan):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert varlen._should_use_cudnn(0) is False
    assert varlen._should_use_cudnn is original
    assert torch.backends.cuda.cudnn_sdp_enabled()
    cpu = Hardware(torch.device("cpu"), "CPU", None, (2, 13), True, True)
    with attention_backend(choose_plan(cpu, attention_backend="flash")):
        assert varlen._should_use_cudnn is original  # nothing to change off CUDA
