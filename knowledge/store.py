"""FAQ files operators upload are kept on disk and re-applied at start-up, so an edit made
in chat (live, without a restart) also survives the next restart."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from knowledge.search import KnowledgeBase, KnowledgeError

log = logging.getLogger(__name__)


def faq_dir(data_dir: Path) -> Path:
    return data_dir / "faq"


def load_knowledge(data_dir: Path) -> KnowledgeBase:
    """The shipped FAQ plus every uploaded file, oldest first (later files win)."""
    kb = KnowledgeBase.load()
    folder = faq_dir(data_dir)
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        try:
            kb.load_extra(path.read_bytes(), path.name)
        except KnowledgeError as exc:  # a file that was valid once; keep serving the rest
            log.error("skipping FAQ file %s: %s", path, exc)
    return kb


def add_faq_file(kb: KnowledgeBase, data_dir: Path, data: bytes, filename: str) -> dict:
    """Validate and apply an uploaded FAQ file live, then keep it for the next start.

    Raises KnowledgeError (and changes nothing) if any row is bad.
    """
    result = kb.load_extra(data, filename)
    folder = faq_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name)[-80:] or "faq.toml"
    (folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}").write_bytes(data)
    return result
