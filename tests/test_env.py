"""`scgeneformer env` and `sgf.show_versions()`: what users paste into bug reports."""

from __future__ import annotations

import pytest
import torch

import scgeneformer as sgf
from scgeneformer._env import environment_report
from scgeneformer.cli import main


def test_report_lists_versions_hardware_settings_and_plans(monkeypatch):
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    monkeypatch.setattr(sgf.settings, "dtype", "float16")
    report = environment_report("cpu")
    assert report.startswith(f"scgeneformer {sgf.__version__}\n")
    assert f"torch         {torch.__version__}" in report
    assert "numpy" in report and "anndata" in report
    assert "CUDA build" in report and "cuDNN" in report
    assert "GPUs\n  none" in report
    assert "dtype              'float16'" in report
    assert "TORCH_CUDNN_SDPA_DEPRIORITIZED  1" in report
    plans = report[report.index("execution plans on cpu") :].splitlines()[1:]
    assert len(plans) == 3
    # float16 asked for on a CPU: the plan says what runs instead, and why
    assert all("padded attention, float32 on CPU" in line for line in plans)
    assert all("no fast float16" in line for line in plans)


def test_cli_env_and_show_versions_print_the_report(capsys):
    assert main(["env", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "execution plans on cpu" in printed
    sgf.show_versions("cpu")
    assert capsys.readouterr().out.strip() == printed.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="sees no CUDA GPU"):
        environment_report("cuda")
