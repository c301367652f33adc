"""A token store built on demand for a large FASTA (``data.fasta_path`` at UniRef50 / TrEMBL scale).

Reading a FASTA into memory costs ~3 KB per sequence on every rank; above ``store_min_mb`` the DataModule trains
from a token store instead, built once by ``pp-preprocess`` into ``cache_dir`` and reused while the file (path,
size, mtime) and the split options are unchanged. The key is in the directory name, so different files and
options never share a store; ``preprocess`` itself resumes a half-built one and returns a finished one as is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from proteinperformer.data.store.preprocess import preprocess
from proteinperformer.data.store.reader import STORE_VERSION, StoreError

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "proteinperformer" / "stores"


def cache_key(fasta: Path, valid_frac: float, test_frac: float, split_seed: int) -> str:
    """16 hex digits identifying (resolved path, size, mtime, split options, store version)."""
    stat = fasta.stat()
    ident = {"path": str(fasta.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "version": STORE_VERSION,
             "valid_frac": valid_frac, "test_frac": test_frac, "split_seed": split_seed}
    return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=8).hexdigest()


def cached_store_path(fasta: Path, cache_dir: str | Path | None, valid_frac: float, test_frac: float,
                      split_seed: int) -> Path:
    """Where the store of ``fasta`` with these options lives (built or not)."""
    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    stem = fasta.name.split(".")[0] or "fasta"
    return root / f"{stem}-{cache_key(fasta, valid_frac, test_frac, split_seed)}"


def build_cached_store(fasta: Path, out: Path, valid_frac: float, test_frac: float, split_seed: int,
                       progress: bool = True) -> Path:
    """Build (or finish, or reuse) the store at ``out``; a cache directory that cannot be written is a
    one-line StoreError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise StoreError(f"{out.parent}: cache directory for the token store of {fasta} is not writable "
                         f"({err.strerror}); set data.cache_dir to a writable directory") from None
    workers = max(1, min(8, len(os.sched_getaffinity(0))))
    preprocess([fasta], out, workers=workers, valid_frac=valid_frac, test_frac=test_frac, split_seed=split_seed,
               progress=progress)
    return out
