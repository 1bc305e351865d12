"""Optional packages: each feature that needs one imports it through require(), whose error names the
package and the extra that brings it (pyproject.toml, [project.optional-dependencies])."""
from __future__ import annotations

import importlib


def require(module: str, package: str, extra: str, feature: str):
    """The imported `module`, or a ModuleNotFoundError saying that `feature` needs pip package `package`,
    brought by the extra `extra`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module.startswith(exc.name):
            raise  # the package is there but one of its own dependencies is not: its error says which
        raise ModuleNotFoundError(
            f"{feature} needs the package {package}, which is not installed: pip install {package} (or the "
            f"[{extra}] extra: pip install --no-build-isolation -e \".[{extra}]\")", name=module) from None
