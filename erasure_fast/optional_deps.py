"""Optional dependencies: absent is a reason, broken is an error that says why.

``import_optional(name)`` gives the module, or None when it (or a package above it) is not
installed. Anything else that goes wrong while importing it -- a broken install, a version clash
between two upstream packages, a module of ours shadowing one of theirs -- is not "not installed":
it raises `OptionalDependencyError` with the original exception's type and text, so that wherever
the problem is reported, the user reads its cause.

``require_optional(name, extra, purpose)`` is the same for a feature that cannot run without it: an
absent module raises `MissingExtraError`, which names the extra of ``pyproject.toml`` that installs it
(``pip install 'erasure_fast[plots]'``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


class OptionalDependencyError(Exception):
    """An optional dependency is installed but fails to import (the cause is in the message and in
    ``__cause__``). Not an ImportError on purpose: code that treats ImportError as "absent" must not
    catch it."""


class MissingExtraError(ModuleNotFoundError):
    """A feature needs an optional dependency that is not installed; the message names the extra
    (``erasure_fast[...]``) that installs it. A ModuleNotFoundError, with ``name`` the missing module."""


def require_optional(name: str, extra: str, purpose: str) -> ModuleType:
    """The module ``name``, needed for ``purpose``; `MissingExtraError` naming ``extra`` when it is not
    installed, `OptionalDependencyError` when it is installed but broken (`import_optional`)."""
    module = import_optional(name)
    if module is None:
        top = name.split(".")[0]
        raise MissingExtraError(f"{purpose} needs {top}, which is not installed: pip install 'erasure_fast[{extra}]'",
                                name=top)
    return module


def import_optional(name: str) -> Optional[ModuleType]:
    """The module ``name``; None when it, or a package above it, is not installed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            return None
        raise OptionalDependencyError(f"{name} is installed but cannot be imported: {_describe(e)}") from e
    except Exception as e:
        raise OptionalDependencyError(f"{name} is installed but cannot be imported: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
