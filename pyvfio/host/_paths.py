"""Where host management may write its records (the bind state and the
persisted bindings), decided before the first write."""

from __future__ import annotations

import os


def records_directory(root: str, override: str | None, env_var: str, default: str) -> str:
    """Where a kind of record lives: ``override`` (a command-line flag), else
    the environment variable ``env_var``, else ``default`` under ``root``
    (empty values count as unset)."""
    if override:
        return override
    return os.environ.get(env_var) or os.path.join(root, default)


def unwritable_directory(directory: str) -> str | None:
    """None when this process could create files in ``directory`` (made on
    demand: the nearest existing directory above it must be writable and
    searchable by the effective ids, which also sees read-only mounts); else
    that nearest existing directory, for the error message."""
    nearest = directory
    while not os.path.isdir(nearest):
        parent = os.path.dirname(nearest)
        if parent == nearest:
            break
        nearest = parent
    return None if os.access(nearest, os.W_OK | os.X_OK, effective_ids=True) else nearest
