"""Gene identifiers: normalising user gene names and resolving them to vocabulary genes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import pandas as pd
from anndata import AnnData

_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


def normalize_gene_id(name: str) -> str:
    """Upper-case a gene identifier and strip an Ensembl version suffix.

    Only Ensembl gene IDs lose their suffix: symbols such as ``AC012345.1`` keep theirs.

    Examples
    --------
    >>> normalize_gene_id("ensg00000141510.17")
    'ENSG00000141510'
    >>> normalize_gene_id("AC012345.1")
    'AC012345.1'
    """
    upper = str(name).strip().upper()
    if "." not in upper:  # most names; the regex costs more than the rest together
        return upper
    match = _ENSEMBL_VERSIONED.match(upper)
    return match.group(1) if match else upper


def resolve_gene_ids(
    names: Iterable[str], known: Mapping[str, int], mapping: Mapping[str, str] | None
) -> list[str | None]:
    """Map gene names to canonical vocabulary IDs, or None where a gene is not in the vocabulary.

    A name is normalised, then looked up in ``mapping`` (as Geneformer collapses IDs through
    its Ensembl mapping dictionary) and, failing that, in ``known`` directly.
    """
    resolved: list[str | None] = []
    for name in names:
        key = normalize_gene_id(name)
        target = mapping.get(key) if mapping is not None else None
        if target is None and key in known:
            target = key
        resolved.append(target if target is not None and target in known else None)
    return resolved


def gene_names(adata: AnnData, gene_key: str | None) -> pd.Index:
    """Return the gene identifiers of ``adata``: ``var_names`` or the column ``var[gene_key]``."""
    if gene_key is None:
        return adata.var_names
    if gene_key not in adata.var.columns:
        raise KeyError(
            f"gene_key={gene_key!r} is not a column of adata.var; the columns are "
            f"{list(adata.var.columns)}. Leave gene_key=None to use adata.var_names."
        )
    return pd.Index(adata.var[gene_key].astype(str))


def describe_mismatch(
    names: pd.Index, vocab_examples: Iterable[str], gene_key: str | None, *, has_cls: bool
) -> str:
    """Explain why no gene matched: examples of both sides and what to try, in Python and CLI.

    ``has_cls`` tells the dictionary generation (V2 vocabularies have ``<cls>``), so the
    symbol mapping suggested is the one that fits: ``gene_name_id_dict_gc30M.pkl`` for V1,
    ``gene_name_id_dict_gc104M.pkl`` for V2.

    Examples
    --------
    >>> text = describe_mismatch(pd.Index(["CD3E"]), ["ENSG00000000003"], None, has_cls=False)
    >>> "--mapping-dict gene_name_id_dict_gc30M.pkl" in text
    True
    """
    ours = ", ".join(map(str, list(names[:3])))
    theirs = ", ".join(list(vocab_examples)[:3])
    source = "adata.var_names" if gene_key is None else f"adata.var[{gene_key!r}]"
    mapping = f"gene_name_id_dict_{'gc104M' if has_cls else 'gc30M'}.pkl"
    hint = (
        "If the Ensembl IDs are in a column of adata.var, pass gene_key='that_column' "
        "(on the command line: --gene-key COLUMN); if the genes are symbols, give the "
        "vocabulary the symbol-to-Ensembl mapping of its Geneformer generation "
        f"(Vocabulary.from_geneformer(..., mapping_dict={mapping!r}); on the command line: "
        f"--mapping-dict {mapping})."
    )
    return f"{source} look like [{ours}], the vocabulary's genes like [{theirs}]. {hint}"
