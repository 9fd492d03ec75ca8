"""Publishing experts to <output_dir>/experts: a whole new set appears at once, or nothing changes.

`experts` is a symbolic link to a sibling folder `.experts-<random>`. A new set is written into a fresh
folder and the link is replaced with a rename, so a server reading `experts` sees the old set or the new
one, never a mix, and a run with nothing to publish leaves the old set in place.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.experts import write_similarity
from orchestrator.results import Winner
from workers.cultures import slug

if TYPE_CHECKING:
    from orchestrator.survey import ExperimentData


def publish_experts(directory: Path, winners: dict[str, Winner], data: ExperimentData) -> Path | None:
    """Swap in a directory holding every winner (safetensors + PEFT adapter) and survey similarity."""
    directory = Path(directory)
    if not winners:
        kept = f"keeping the experts already in {directory}" if directory.exists() else "nothing to publish"
        print(f"warning: no finished trial holds an expert; {kept}", file=sys.stderr)
        return None
    root = directory.parent
    root.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
    for culture, winner in sorted(winners.items()):
        shutil.copy2(winner.expert_file, version)
        shutil.copytree(winner.adapter_dir, version / "peft" / slug(culture))
    write_similarity(version, data, sorted(winners))
    previous = _swap_in(directory, version)
    _remove_old_versions(directory, keep={version.name, previous})
    print(f"saved {len(winners)} experts to {directory}", flush=True)
    return directory


def _swap_in(directory: Path, version: Path) -> str | None:
    """Point `directory` at `version` with one rename; return the folder it pointed at before."""
    if directory.is_symlink():
        previous = os.readlink(directory)
    elif directory.exists():
        # A plain folder from before links existed (or `train --local`): moved aside once, not deleted.
        previous = tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent)
        os.rmdir(previous)
        directory.rename(previous)
        previous = Path(previous).name
    else:
        previous = None
    link = directory.parent / f".{directory.name}-link-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(version.name)  # relative: the output directory can move as a whole
    os.replace(link, directory)
    return previous


def _remove_old_versions(directory: Path, keep: set) -> None:
    """Delete published sets older than the previous one (a reader may still be in the previous one)."""
    for folder in directory.parent.glob(f".{directory.name}-*"):
        if folder.name not in keep and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
