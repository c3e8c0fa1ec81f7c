"""A Hugging Face hub cache filled from local folders, laid out as huggingface_hub lays it out, for offline tests
and demos of hub ids (`HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1`):

    DIR/models--ORG--NAME/blobs/<sha256 of the file>
    DIR/models--ORG--NAME/snapshots/<commit>/<path>  -> ../../blobs/<sha256>  (relative symlinks)
    DIR/models--ORG--NAME/refs/<revision>            the commit hash, no newline

python -m ptrain.testing.hub_cache --cache DIR --repo ORG/NAME --folder CKPT [--revision main]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
from pathlib import Path


def add_snapshot(cache: str | Path, repo: str, folder: str | Path, revision: str = "main") -> str:
    """Copy `folder` into the cache as one commit of `repo` and point `refs/<revision>` at it; returns the commit
    (derived from the files, so the same folder gives the same commit)."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for f in files:
        digest.update(str(f.relative_to(folder)).encode() + hashlib.sha256(f.read_bytes()).digest())
    commit = digest.hexdigest()
    for f in files:
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = root / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return commit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ptrain.testing.hub_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="hub cache folder (what HF_HUB_CACHE names)")
    ap.add_argument("--repo", required=True, help="hub id ORG/NAME")
    ap.add_argument("--folder", required=True, help="checkpoint folder to copy in")
    ap.add_argument("--revision", default="main", help="ref (branch / tag) that points at the new commit")
    args = ap.parse_args(argv)
    print(add_snapshot(args.cache, args.repo, args.folder, args.revision))


if __name__ == "__main__":
    main()
