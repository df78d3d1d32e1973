"""In silico deletion under torchrun: two gloo processes share the cells, results unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

import scgeneformer as sgf

from .test_in_silico import TINY

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import anndata as ad
    import torch
    import scgeneformer as sgf

    if __name__ == "__main__":
        torch.set_num_threads(1)
        sgf.settings.progress = False
        adata = ad.read_h5ad(sys.argv[1])
        model = sgf.Geneformer.from_pretrained(sys.argv[2])
        sgf.tl.in_silico_delete(
            adata, model, state_key="state", start_state="disease", goal_state="healthy",
            max_cells=8, min_cells=1,
        )
        columns = [c for c in adata.var.columns if c.startswith("in_silico_delete")]
        prefix = os.path.join(sys.argv[3], f"rank{os.environ['RANK']}")
        adata.var[columns].to_csv(prefix + ".csv")
        # A file per rank: the two processes' stdout lines interleave.
        with open(prefix + ".n_processes", "w") as handle:
            handle.write(str(adata.uns["in_silico_delete"]["n_processes"]))
    """
)


def run_on_two_processes(tmp_path, script: str, n_cells: int):
    """Save small cells and a tiny model, run ``script`` on them under a two-process torchrun."""
    adata = sgf.datasets.synthetic_states(n_cells=n_cells, n_genes=120, random_state=4)
    vocab = sgf.Vocabulary.build(adata, max_length=256)
    model = sgf.Geneformer.from_config("V1-10M", vocab, random_state=0, **TINY)
    sgf.pp.rank_tokenize(adata, vocab)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    model.save(tmp_path / "model")
    (tmp_path / "run.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(tmp_path / "run.py")]
    command += [str(tmp_path / "cells.h5ad"), str(tmp_path / "model"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return adata, model


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch has no distributed")
def test_two_processes_give_the_one_process_screen(tmp_path):
    adata, model = run_on_two_processes(tmp_path, SCRIPT, n_cells=80)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.n_processes").read_text() == "2"
    sgf.tl.in_silico_delete(
        adata,
        model,
        state_key="state",
        start_state="disease",
        goal_state="healthy",
        max_cells=8,
        min_cells=1,
    )
    columns = [c for c in adata.var.columns if c.startswith("in_silico_delete")]
    for rank in (0, 1):
        shared = pd.read_csv(tmp_path / f"rank{rank}.csv", index_col=0)
        for column in columns:
            np.testing.assert_allclose(
                shared[column].to_numpy(dtype=float),
                adata.var[column].to_numpy(dtype=float),
                rtol=1e-5,
                atol=1e-7,
                equal_nan=True,
            )


COMBINED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import anndata as ad
    import torch
    import torch.distributed as dist
    import scgeneformer as sgf
    import scgeneformer.tl._screen_run as screens

    if __name__ == "__main__":
        torch.set_num_threads(1)
        sgf.settings.progress = False
        adata = ad.read_h5ad(sys.argv[1])
        model = sgf.Geneformer.from_pretrained(sys.argv[2])
        encoded = []  # start cells this process embedded (state embeddings aside)
        real = screens.encode_cells

        def counting(model, tokens, n_tokens, **kwargs):
            if not kwargs.get("desc", "").startswith("state"):
                encoded.append(len(n_tokens))
            return real(model, tokens, n_tokens, **kwargs)

        screens.encode_cells = counting
        sgf.tl.in_silico_delete(
            adata, model, state_key="state", start_state="disease", goal_state="healthy",
            genes=list(model.vocab.genes[:5]), combine=True, max_cells=8,
        )
        prefix = os.path.join(sys.argv[3], f"combined{os.environ['RANK']}")
        adata.obs[["in_silico_delete_combined_shift"]].to_csv(prefix + ".csv")
        with open(prefix + ".json", "w") as handle:
            json.dump({"encoded": encoded, "group_open": dist.is_initialized()}, handle)
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch has no distributed")
def test_combined_deletion_splits_cells_over_processes_and_closes_its_group(tmp_path):
    import json

    adata, model = run_on_two_processes(tmp_path, COMBINED_SCRIPT, n_cells=60)
    with pytest.warns(UserWarning, match="pretrained encoder"):
        sgf.tl.in_silico_delete(
            adata,
            model,
            state_key="state",
            start_state="disease",
            goal_state="healthy",
            genes=list(model.vocab.genes[:5]),
            combine=True,
            max_cells=8,
        )
    alone = adata.obs["in_silico_delete_combined_shift"].to_numpy(dtype=float)
    for rank in (0, 1):
        record = json.loads((tmp_path / f"combined{rank}.json").read_text())
        assert record == {"encoded": [4, 4], "group_open": False}  # half the cells, group closed
        shared = pd.read_csv(tmp_path / f"combined{rank}.csv", index_col=0)
        np.testing.assert_allclose(
            shared.iloc[:, 0].to_numpy(dtype=float), alone, rtol=1e-5, atol=1e-7, equal_nan=True
        )
