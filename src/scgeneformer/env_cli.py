"""``scgeneformer env``: the environment report (imports torch only when it runs)."""

from __future__ import annotations

import argparse


def _env(args: argparse.Namespace) -> int:
    from ._env import environment_report

    print(environment_report(args.device))
    return 0


def add_env_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``env`` to the ``scgeneformer`` command line.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> add_env_command(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["env", "--device", "cpu"]).device
    'cpu'
    """
    env = subparsers.add_parser(
        "env",
        help="versions, torch/CUDA/cuDNN, GPUs and the execution plan of each tool (for bug "
        "reports)",
    )
    env.add_argument("--device", help="plan for this device (default: the setting)")
    env.set_defaults(run=_env)
