"""Where devstack keeps downloaded artifacts and default data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache root: ``$DEVSTACK_CACHE`` if set, else ``.cache/`` in the repository."""
    override = os.environ.get("DEVSTACK_CACHE")
    return Path(override).resolve() if override else REPO_ROOT / ".cache"


def default_data_dir() -> Path:
    """Data directory used by ``python -m devstack up`` when none is given."""
    return cache_dir() / "devstack"
