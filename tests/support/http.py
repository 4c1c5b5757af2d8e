"""A GET that never raises, for polling the bridge's and the workers' HTTP endpoints."""

from __future__ import annotations

import urllib.error
import urllib.request


def get(url: str) -> tuple[int | None, str]:
    """Status and body of a GET (None and the error when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, str(exc)
