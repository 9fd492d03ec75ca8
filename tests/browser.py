"""A real headless browser (Debian's `chromium`) for tests and docs: a page's DOM after its scripts ran, a PNG."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, sandbox-free (containers), and quiet: no updates, sync or other traffic beyond the page.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,900",
    # The page's clock runs ahead to its last pending task (fetches included) within this budget, so
    # what is captured is the page once its data arrived, not a fixed wait.
    "--virtual-time-budget=15000",
)


def _chromium(url: str, action: str, timeout: float) -> str:
    if CHROMIUM is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", action, url],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    return done.stdout


def page_dom(url: str, timeout: float = 90) -> str:
    """The page's DOM, serialised after its scripts ran and its data arrived."""
    return _chromium(url, "--dump-dom", timeout)


def screenshot(url: str, path: Path, timeout: float = 90) -> Path:
    """Save a PNG of the page as a 1400x900 window shows it."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, f"--screenshot={path}", timeout)
    return path
