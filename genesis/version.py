"""What code is running: the package version and the git commit (`genesis --version`, MLflow's code_version tag).

Imports nothing heavy (no torch, no pydantic), so `genesis --version` answers at once."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The git commit the code runs from (with `-dirty` if it has local changes), or `unknown`."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """`genesis 0.1.0 (git 1a2b3c4d5e6f), torch 2.13.0, Python 3.11.9`: read from package metadata, nothing imported."""
    import platform

    torch = package_version("torch")
    return (f"genesis {package_version('genesis') or 'unknown'} (git {code_version()})"
            + (f", torch {torch}" if torch else "") + f", Python {platform.python_version()}")
