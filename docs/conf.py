"""Sphinx configuration for scgeneformer's documentation.

The build is offline (no intersphinx: neither this machine nor CI may reach the network) and
does not execute code: the tutorials are stored with their outputs and copied from
``tutorials/`` into ``generated/tutorials/`` (git-ignored) at every build.
"""

import inspect
import shutil
import warnings
from pathlib import Path

from scgeneformer import __version__

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

project = "scgeneformer"
author = "scgeneformer developers"
copyright = "scgeneformer developers"
release = version = __version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "_templates", "**.ipynb_checkpoints"]

# API reference: numpy docstrings, one page per object. A class shows the members it defines or
# inherits from this package, not those of torch.nn.Module (torch documents them).
autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": True}
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes" as fields of their own object, never module-level names
# The package's "Returns" sections are prose (and definition lists of result slots), not numpy's
# "type, then indented description": render them as written, not split into one bullet a line.
napoleon_custom_sections = ["Returns"]
typehints_document_rtype = False  # the numpy "Returns" sections say what comes back
always_document_param_types = False

# Tutorials: rendered from their stored outputs, never re-executed here.
nb_execution_mode = "off"
nb_merge_streams = True
myst_heading_anchors = 3

html_theme = "furo"
html_title = "scgeneformer"

# sphinx-autodoc-typehints still calls an API that Sphinx 9 deprecates; that is its concern,
# not a problem of these docs, so its RemovedInSphinx10Warning is not printed.
warnings.filterwarnings("ignore", message=r".*set_application.* is deprecated")


def _copy_tutorials() -> None:
    """Mirror ``tutorials/*.ipynb`` into ``generated/tutorials/`` (Sphinx reads only docs/)."""
    source = ROOT / "tutorials"
    target = HERE / "generated" / "tutorials"
    target.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in sorted(source.glob("*.ipynb"))}
    for stale in target.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for name, path in wanted.items():
        copy = target / name
        # Copy only what changed, so that incremental builds stay incremental.
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)


_copy_tutorials()

# torch.nn.Module's plumbing that a Geneformer model inherits or overrides: torch documents it.
_TORCH_MODULE_MEMBERS = {
    "training",
    "extra_repr",
    "call_super_init",
    "dump_patches",
    "T_destination",
}


def _skip_member(app, what, name, obj, skip, options):
    """Leave members defined outside scgeneformer (torch.nn.Module's) out of class pages."""
    if name in _TORCH_MODULE_MEMBERS:
        return True
    # The function behind a property or functools.cached_property, else the member itself.
    function = getattr(obj, "fget", None) or getattr(obj, "func", None) or obj
    if inspect.isroutine(function):
        module = getattr(function, "__module__", None) or ""
        if not module.startswith("scgeneformer"):
            return True
    return None


def _undo_return_type_marker(app, what, name, obj, options, lines):
    """Remove the ``:`` that sphinx-autodoc-typehints puts under "Returns" for napoleon.

    It tells napoleon's numpy "Returns" parser that there is no type; with "Returns" read as
    prose (``napoleon_custom_sections`` above) it would be printed.
    """
    for i in range(len(lines) - 2):
        header = lines[i].strip().lower() in {"return", "returns"}
        if header and set(lines[i + 1].strip()) == {"-"} and lines[i + 2] == ":":
            del lines[i + 2]
            return


def setup(app):
    """Register the member filter and the docstring fix (after sphinx-autodoc-typehints's)."""
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-docstring", _undo_return_type_marker, priority=499)
