"""Reading Geneformer's official dictionaries (token ids, medians, identifier mappings).

Pickles are read only through the restricted unpickler (:mod:`scgeneformer._safe_pickle`);
from a hub repository only when one is named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._genes import normalize_gene_id
from ._safe_pickle import load_plain_dict

PathOrDict = str | os.PathLike | Mapping[str, Any]
# Token ids index the model's embedding table, one row per id up to the largest; Geneformer's
# run to about 25,000. Far beyond that an id is a damaged or wrong file, not a vocabulary.
MAX_TOKEN_ID = 2**24 - 1


def check_token_ids(tokens: Mapping[str, Any]) -> None:
    """Refuse token dictionaries whose values are text, or ids no embedding table could hold."""
    for name, value in tokens.items():
        if isinstance(value, str | bytes):
            raise ValueError(
                f"The token dictionary maps {name!r} to {value!r}, text rather than a token "
                "id: is it a gene name or ID mapping (gene_name_id_dict_*.pkl, "
                "ensembl_mapping_dict_*.pkl) passed as the token dictionary? Pass that as "
                "mapping_dict, and token_dictionary_*.pkl as the token dictionary."
            )
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(
                f"The token dictionary maps {name!r} to {value!r} ({type(value).__name__}); "
                "token ids must be integers."
            )
        if not 0 <= value <= MAX_TOKEN_ID:
            raise ValueError(
                f"The token dictionary maps {name!r} to {value}, outside 0..{MAX_TOKEN_ID:,}: "
                "token ids index the model's embedding table (Geneformer's go to about "
                "25,000), so this is not a usable token dictionary. Is the file damaged?"
            )


def _as_dict(source: PathOrDict, what: str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    return load_plain_dict(source, what=what)


def read_geneformer_dicts(
    token_dict: PathOrDict,
    median_dict: PathOrDict,
    mapping_dict: PathOrDict | Sequence[PathOrDict] | None,
    *,
    repo_id: str | None,
    subfolder: str | None,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> tuple[dict[str, int], dict[str, float], dict[str, int], dict[str, str] | None]:
    """Read and check the dictionaries: gene tokens, their medians, special tokens, mapping.

    See :meth:`scgeneformer.Vocabulary.from_geneformer` for the arguments.
    """
    if repo_id is not None:
        from ._hub import HubOptions, hub_file

        options = HubOptions(revision, cache_dir, local_files_only)

        def fetch(source):
            if isinstance(source, Mapping):
                return source
            if isinstance(source, str | os.PathLike):
                return hub_file(repo_id, str(source), subfolder, options)
            return [fetch(s) for s in source]

        token_dict, median_dict = fetch(token_dict), fetch(median_dict)
        mapping_dict = None if mapping_dict is None else fetch(mapping_dict)
    tokens = _as_dict(token_dict, "token dictionary")
    check_token_ids(tokens)
    special = {k: int(v) for k, v in tokens.items() if k.startswith("<") and k.endswith(">")}
    genes = {k: int(v) for k, v in tokens.items() if k not in special}
    non_int = [k for k, v in tokens.items() if not float(v).is_integer()]
    if non_int:
        raise ValueError(
            f"The token dictionary maps {non_int[:3]} to non-integer ids: is it a median "
            "dictionary passed in the wrong place?"
        )
    medians_all = _as_dict(median_dict, "median dictionary")
    medians = {g: medians_all[g] for g in genes if g in medians_all}
    mapping: dict[str, str] | None = None
    if mapping_dict is not None:
        sources = (
            [mapping_dict]
            if isinstance(mapping_dict, str | os.PathLike | Mapping)
            else list(mapping_dict)
        )
        mapping = {}
        for source in sources:
            for key, value in _as_dict(source, "gene mapping dictionary").items():
                mapping.setdefault(normalize_gene_id(key), str(value))
    return genes, medians, special, mapping
