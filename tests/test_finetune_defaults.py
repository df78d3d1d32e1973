"""Fine-tuning defaults that learn on small data: batches sized from the data, lr range test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import scgeneformer as sgf
from scgeneformer.train._lr_range import chosen_rate, lr_range_test

from .test_finetune import tiny_model


@pytest.fixture(scope="module")
def small():
    adata = sgf.datasets.synthetic_states(n_cells=160, n_genes=200, n_donors=5, random_state=0)
    vocab = sgf.Vocabulary.build(adata, max_length=32)
    return adata, vocab


def test_the_defaults_learn_where_geneformers_recipe_stays_at_chance(small):
    # 160 cells of 32 tokens: the token budget makes an epoch one optimiser step, and at
    # Geneformer's 5e-5 ten epochs leave the classifier at chance; measured: macro-F1 0.33.
    adata, vocab = small
    recipe = adata.copy()
    sgf.tl.finetune(
        recipe,
        tiny_model(vocab),
        label_key="state",
        group_key="donor",
        lr=5e-5,
        token_budget=sgf.settings.token_budget // 4,
        early_stopping_patience=None,
    )
    assert (
        recipe.uns["state_finetune"]["history"]["train"]["step"].iloc[-1] == 10
    )  # one step an epoch
    assert recipe.uns["state_finetune"]["macro_f1"] < 0.5

    adata = adata.copy()
    sgf.tl.finetune(adata, tiny_model(vocab), label_key="state", group_key="donor")
    result = adata.uns["state_finetune"]
    history = result["history"]["train"]
    steps_per_epoch = history["step"].iloc[0]
    assert steps_per_epoch >= 28  # about 32 (padding to the longest cell of a batch)
    assert history["token_budget"].iloc[0] < sgf.settings.token_budget // 4
    assert 1e-5 < history["peak_lr"].iloc[0] < 1e-1  # chosen by the range test
    assert result["params"]["lr"] == "auto" and result["params"]["train_budget"] == "auto"
    assert result["macro_f1"] > 0.8


def test_the_range_test_restores_the_weights_and_stops_when_the_loss_diverges():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def step(optimizer, batch):
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    batches = [slice(i, i + 32) for i in range(0, 256, 32)]
    lr, curve = lr_range_test(
        net,
        batches,
        step,
        lambda rate: torch.optim.SGD(net.parameters(), lr=rate),
        low=1e-4,
        high=1e4,
        n_steps=80,
    )
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])
    # SGD at rates near 1e4 diverges: the test stops before its last rate.
    assert len(curve["lr"]) < 80
    lowest = curve["lr"][int(np.argmin(curve["loss"]))]
    assert lr == pytest.approx(lowest / 10)


def test_on_a_plateau_the_range_test_backs_off_from_where_the_loss_rises():
    # A model whose loss does not move until the rate is large, then rises: the lowest
    # point of the curve is noise at the smallest rates, which left small classifiers at
    # chance; the rate must come from the edge where the loss starts to rise.
    net = nn.Linear(2, 2)
    rng = np.random.default_rng(0)
    rates_seen = []

    def step(optimizer, batch):
        rate = optimizer.param_groups[0]["lr"]
        rates_seen.append(rate)
        return 0.693 * (1 + 1e-4 * rng.standard_normal()) + (0.5 if rate > 0.02 else 0.0)

    lr, _ = lr_range_test(net, [0], step, lambda rate: torch.optim.SGD(net.parameters(), lr=rate))
    edge = min(r for r in rates_seen if r > 0.02)
    # The smoothed loss crosses 1% above the plateau within a step or two of the edge.
    assert edge / 10 <= lr <= edge * 1.5 / 10
    assert chosen_rate([1e-4, 1e-3, 1e-2], [0.9, 0.5, 2.0]) == pytest.approx(1e-4)
    # The first points of the debiased curve are single batches: one that happens to be low
    # is not a descent (it gave 1e-6 on two of tutorial 5's five splits).
    rates = np.geomspace(1e-6, 0.1, 64)
    losses = np.where(rates > 0.02, 0.8, 0.693)
    losses[0] = 0.682
    edge = rates[rates > 0.02][0]
    assert chosen_rate(rates, losses) == pytest.approx(edge / 10)
    assert chosen_rate([1e-4, 1e-3, 1e-2], [0.69, 0.69, 0.69]) == pytest.approx(1e-3)


def test_bad_learning_rates_are_refused(small):
    adata, vocab = small
    for bad in ("fast", 0.0, -1e-3):
        with pytest.raises(ValueError, match=r"lr must be 'auto' or a positive number"):
            sgf.tl.finetune(adata.copy(), tiny_model(vocab), label_key="state", lr=bad)
