"""Two gloo processes under torchrun: identical replicas, the loss of one process with the same
global batch, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import scgeneformer as sgf
from scgeneformer.pretrain_cli import build_model, load_config
from scgeneformer.tl._pretrain import pretrain
from scgeneformer.train._checkpoints import list_checkpoints

from .test_pretrain import TINY, counts_corpus

TRAINING = {
    "max_steps": 6,
    "warmup_steps": 2,
    "token_budget": 512,
    "save_every": 3,
    "log_every": 1,
    "eval_fraction": 0.1,
    "lr": 2e-3,
}

# Run by torchrun in each process: train from the config, then dump this rank's parameters.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import scgeneformer as sgf
    from scgeneformer.pretrain_cli import run_config

    if __name__ == "__main__":
        torch.set_num_threads(1)
        sgf.settings.progress = False
        model = run_config(sys.argv[1])
        torch.save(model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch has no distributed")
def test_two_gloo_processes_equal_one_process_with_accumulation(tmp_path):
    paths = counts_corpus(tmp_path, n_files=2, n_cells=120)
    vocab = sgf.Vocabulary.build(paths, max_length=64)
    vocab.save(tmp_path / "vocab.json")
    # No dropout: the two layouts draw dropout masks differently.
    overrides = {**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = {
        "data": [p.name for p in paths],
        "output_dir": "ddp",
        "n_jobs": 1,
        "model": {
            "preset": "V1-10M",
            "vocabulary": "vocab.json",
            "overrides": overrides,
            "random_state": 0,
        },
        "training": TRAINING,
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "train.py"),
            str(tmp_path / "run.json"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    ddp_dir = tmp_path / "ddp"
    assert [s for s, _ in list_checkpoints(ddp_dir)] == [3, 6]
    ddp_history = json.loads((ddp_dir / "history.json").read_text())
    assert [r["step"] for r in ddp_history["train"]] == list(range(1, 7))
    assert sgf.Geneformer.from_pretrained(ddp_dir).training_args["world_size"] == 2

    # One process, two batches accumulated per step: the same global batches.
    single = pretrain(
        ddp_dir / "token_store",
        build_model(load_config(tmp_path / "run.json")["model"]),
        output_dir=tmp_path / "single",
        gradient_accumulation_steps=2,
        **TRAINING,
    )
    single_history = single.training_args["history"]
    np.testing.assert_allclose(
        [r["loss"] for r in ddp_history["train"]],
        [r["loss"] for r in single_history["train"]],
        rtol=1e-5,
    )
    assert [e["n_masked"] for e in ddp_history["eval"]] == [
        e["n_masked"] for e in single_history["eval"]
    ]
    np.testing.assert_allclose(
        [e["loss"] for e in ddp_history["eval"]],
        [e["loss"] for e in single_history["eval"]],
        rtol=1e-5,
    )
    single_state = single.state_dict()
    for key in rank0:
        torch.testing.assert_close(rank0[key], single_state[key], rtol=1e-4, atol=1e-6)
