"""``scgeneformer pretrain CONFIG``: pretraining from a JSON or TOML file, torchrun-ready.

A config names the data, the model and the run; paths are relative to the config's folder.
``[training]`` takes any keyword argument of :func:`scgeneformer.tl.pretrain` (``layer`` and
``gene_key`` also as ``--layer`` and ``--gene-key``)::

    data = ["corpus/a.h5ad", "corpus/b.h5ad"]   # or a token store / arrow data set folder
    output_dir = "runs/v1"
    n_jobs = 8                                   # optional: sgf.settings.n_jobs

    [model]
    preset = "V1-10M"                            # a fresh model over this vocabulary ...
    vocabulary = "vocab.json"                    # (or token_dictionary + median_dictionary)
    overrides = { num_hidden_layers = 4 }
    random_state = 0
    # pretrained = "runs/v0"                     # ... or continue from a saved model

    [training]
    max_steps = 100000
    warmup_steps = 10000
    save_every = 1000

Run it with ``scgeneformer pretrain run.toml`` on one device, or
``torchrun --nproc-per-node 8 -m scgeneformer pretrain run.toml`` on several.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cli_errors import add_debug_flag, run_reporting_errors

_TOP_KEYS = {"data", "output_dir", "model", "training", "n_jobs"}
_MODEL_KEYS = {
    "preset",
    "pretrained",
    "vocabulary",
    "token_dictionary",
    "median_dictionary",
    "mapping_dictionary",
    "overrides",
    "random_state",
}


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pretraining config (``.json`` or ``.toml``) and check its keys.

    Relative paths in it are made relative to the config file's folder.

    Examples
    --------
    >>> config = load_config("run.toml")  # doctest: +SKIP
    >>> config["output_dir"]  # doctest: +SKIP
    '/home/me/runs/v1'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            config = tomllib.loads(text)
        else:
            config = json.loads(text)
    except ValueError as err:  # tomllib.TOMLDecodeError and JSONDecodeError both are
        raise ValueError(f"Config file {str(path)!r} does not parse: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a table of settings.")
    from .tl._pretrain import pretrain

    training_keys = set(inspect.signature(pretrain).parameters) - {"data", "model", "output_dir"}
    model = config.get("model")
    model_table = model if isinstance(model, dict) else {}
    for where, keys, known in (
        ("the config", set(config), _TOP_KEYS),
        ("[model]", set(model_table), _MODEL_KEYS),
        ("[training]", set(config.get("training", {})), training_keys),
    ):
        unknown = sorted(keys - known)
        if unknown:
            raise ValueError(
                f"Unknown key(s) {unknown} in {where} of {str(path)!r}; known: {sorted(known)}."
            )
    for key in ("data", "output_dir", "model"):
        if key not in config:
            raise ValueError(f"Config file {str(path)!r} needs a '{key}' entry.")

    base = path.resolve().parent

    def resolve(value: str) -> str:
        return str(base / Path(value).expanduser())

    data = config["data"]
    config["data"] = resolve(data) if isinstance(data, str) else [resolve(p) for p in data]
    config["output_dir"] = resolve(config["output_dir"])
    if isinstance(model, str):
        config["model"] = {"pretrained": resolve(model)}
    else:
        paths = [k for k in model_table if k in ("pretrained", "vocabulary") or "dictionary" in k]
        for key in paths:
            model_table[key] = resolve(model_table[key])
    return config


def build_model(spec: dict[str, Any]):
    """Build the model that a config's ``[model]`` table describes.

    Examples
    --------
    >>> build_model({"preset": "V1-10M", "vocabulary": "vocab.json"})  # doctest: +SKIP
    """
    from .model import Geneformer
    from .vocab import Vocabulary

    if "pretrained" in spec:
        if "preset" in spec or "overrides" in spec:
            raise ValueError("[model] takes either 'pretrained' or 'preset' (+ 'overrides').")
        vocab = Vocabulary.load(spec["vocabulary"]) if "vocabulary" in spec else None
        return Geneformer.from_pretrained(spec["pretrained"], vocab)
    if "vocabulary" in spec:
        vocab = Vocabulary.load(spec["vocabulary"])
    elif "token_dictionary" in spec and "median_dictionary" in spec:
        vocab = Vocabulary.from_geneformer(
            spec["token_dictionary"], spec["median_dictionary"], spec.get("mapping_dictionary")
        )
    else:
        raise ValueError(
            "[model] needs 'pretrained' (a model folder), or 'preset' with 'vocabulary' (a "
            "Vocabulary.save file) or 'token_dictionary' and 'median_dictionary'."
        )
    return Geneformer.from_config(
        spec.get("preset", "V1-10M"),
        vocab,
        random_state=spec.get("random_state"),
        **spec.get("overrides", {}),
    )


def run_config(path: str | os.PathLike, *, resume: bool | None = None, **overrides: Any):
    """Pretrain as a config file says; ``resume`` and ``overrides`` replace its ``[training]``.

    ``overrides`` that are None are left out (the command line's unset options).

    Examples
    --------
    >>> model = run_config("run.toml")  # doctest: +SKIP
    """
    from ._settings import settings
    from .tl._pretrain import pretrain

    config = load_config(path)
    if "n_jobs" in config:
        settings.n_jobs = int(config["n_jobs"])
    training = dict(config.get("training", {}))
    if resume is not None:
        training["resume"] = resume
    training.update({k: v for k, v in overrides.items() if v is not None})
    model = build_model(config["model"])
    return pretrain(config["data"], model, output_dir=config["output_dir"], **training)


def _run(args: argparse.Namespace) -> int:
    model = run_config(args.config, resume=args.resume, layer=args.layer, gene_key=args.gene_key)
    if int(os.environ.get("RANK", "0")) == 0:
        evaluation = model.training_args["history"]["eval"]
        accuracy = f", held-out accuracy {evaluation[-1]['accuracy']:.3f}" if evaluation else ""
        print(
            f"{model.training_args['steps']:,} steps{accuracy}; model and history in "
            f"{load_config(args.config)['output_dir']}"
        )
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="JSON or TOML file: data, model, output_dir, [training]")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the newest checkpoint in output_dir",
    )
    parser.add_argument(
        "--layer", help="layer of the h5ad files that holds the counts (default: X)"
    )
    parser.add_argument(
        "--gene-key", help="var column of the h5ad files with Ensembl ids (default: var_names)"
    )
    parser.set_defaults(run=_run)
    return parser


def add_pretrain_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pretrain CONFIG [--resume] [--layer L] [--gene-key K]`` to the command line.

    Examples
    --------
    >>> parser = argparse.ArgumentParser(prog="scgeneformer")
    >>> _ = add_pretrain_command(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["pretrain", "run.toml", "--resume"]).resume
    True
    """
    return _add_arguments(
        subparsers.add_parser(
            "pretrain",
            help="masked-gene pretraining from a JSON/TOML config (torchrun-ready)",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scgeneformer.pretrain_cli CONFIG [--resume]``.

    Examples
    --------
    >>> main(["run.toml"])  # doctest: +SKIP
    0
    """
    parser = argparse.ArgumentParser(
        prog="python -m scgeneformer.pretrain_cli",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_debug_flag(parser)
    args = _add_arguments(parser).parse_args(argv)
    return run_reporting_errors(args)


if __name__ == "__main__":
    sys.exit(main())
