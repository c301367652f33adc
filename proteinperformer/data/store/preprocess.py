"""Streaming FASTA -> sharded token store (the TrEMBL-scale route; read it back with ``store.open_store``).

Pipeline (``preprocess``):

1. **read**: each input (plain or gzip, detected by magic bytes) is read in big binary blocks of about
   ``chunk_mb`` MB, cut after the last complete record (``b"\\n>"``), by the FASTA reader that training from a
   FASTA and inference use as well (:mod:`proteinperformer.data.fasta`: the same rules and error messages).
   Memory is a few blocks per process, whatever the input size.
2. **parse + encode** (in ``workers`` processes): one block -> one shard (``fasta.parse_block``: records split
   at ``\\n>``, residues encoded with a 256-entry lookup table, the same ids as ``Alphabet.encode``, headers
   parsed with ``parse_uniprot_header``). A shard is a directory ``shards/FFFF-CCCCCC/`` holding
   ``tokens.npy`` (uint8 residues, all records back to back), ``offsets.npy`` (int64, n + 1),
   ``meta.parquet`` (accession, header fields, length, file, line) and ``shard.json`` (counts, checksums).
   It is written to a temp directory and renamed, so a shard either exists completely or not at all.
3. **finalize** (cheap, reruns on every invocation): duplicate accessions, length filter, optional
   exact-duplicate removal, split by accession hash (+ held-out OOD list) -> ``metadata/*.parquet`` (``split``
   and ``status`` of every shard row; ``TokenStore.metadata()`` joins them to the shard tables),
   ``index/{split}.rows.npy`` / ``.lengths.npy``, ``skipped.parquet`` and finally ``manifest.json``.
   Readers refuse a store without a manifest.

Resuming: rerunning with the same inputs and parsing arguments (``chunk_mb``, ``on_invalid``) keeps every
completed shard (still re-reads the input to find the block boundaries) and re-does only the rest.
Finalize-only arguments (length filter, dedup, splits, holdout) may change between runs. A finished store
(manifest of this version, same inputs and all arguments equal) is returned as it is, nothing re-read.

Normalisations (counted in ``manifest.json["counters"]``): Windows line endings (``cr_bytes``), lower-case
residues (accepted, as ``Alphabet.encode``), one terminal ``*`` (``stop_codon_stripped``), blank lines and
spaces inside sequences. Bad records (invalid character, no sequence, ``>`` without id) raise a
:class:`FastaFormatError` naming file, line and id (``on_invalid="error"``, default) or are skipped, counted
and listed in ``skipped.parquet`` (``on_invalid="skip"``). Duplicate accessions raise the same way (default)
or keep the first occurrence (``on_duplicate_id="skip"``). Memory note: finalize holds ~30 bytes per
sequence (lengths, hashes, row ids): about 3 GB for TrEMBL's 100M sequences.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from proteinperformer.data.fasta import FastaFormatError, iter_blocks, open_fasta
from proteinperformer.data.store.build import load_shard_summary, prefetch, process_block, shard_name
from proteinperformer.data.store.clusters import ClusterTable, file_digest
from proteinperformer.data.store.finalize import finalize, read_holdout
from proteinperformer.data.store.reader import STORE_VERSION, StoreError, check_shard_sizes
from proteinperformer.files import write_text_atomic, writing
from proteinperformer.progress import track

SHARD_VERSION = 1  # layout of shards/ (config.json): shards of this version are reused across store versions


# ---------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------
def finalize_request(min_len, max_len, dedup, on_duplicate_id, holdout, valid_frac, test_frac, split_seed,
                     clusters: Path | None = None) -> dict:
    """The finalize arguments as ``manifest.json["finalize_args"]`` records them (holdout by size and digest,
    the clusters file by path, size and mtime)."""
    digest = hashlib.blake2b("\n".join(sorted(holdout or ())).encode(), digest_size=8).hexdigest()
    return {"min_len": min_len, "max_len": max_len, "dedup": dedup, "on_duplicate_id": on_duplicate_id,
            "valid_frac": valid_frac, "test_frac": test_frac, "split_seed": split_seed,
            "holdout_size": len(holdout or ()), "holdout_digest": digest,
            "clusters": None if clusters is None else {"path": str(clusters), "digest": file_digest(clusters)}}


def finished_store(out: Path, config: dict, requested: dict) -> dict | None:
    """The manifest of a finished store at ``out`` built from the same inputs and arguments, else None
    (then ``preprocess`` resumes: reuses the shards, reruns finalize)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        same_inputs = json.loads((out / "config.json").read_text()) == config
        check_shard_sizes(out, manifest["shards"])  # a damaged shard: resume, which rebuilds it
    except (OSError, ValueError, KeyError, StoreError):
        return None
    if same_inputs and manifest.get("version") == STORE_VERSION and manifest.get("finalize_args") == requested:
        manifest["run"] = {**manifest.get("run", {}), "finalize_skipped": True}
        return manifest
    return None


def _check_config(out: Path, config: dict, overwrite: bool) -> None:
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != config:
            if not overwrite:
                raise StoreError(
                    f"{out}: this store was started with other inputs or parsing arguments "
                    f"(was {old}, now {config}); use another output directory or pass --overwrite"
                )
            shutil.rmtree(out / "shards", ignore_errors=True)
    elif out.exists() and any(out.iterdir()) and not (out / "shards").exists():
        raise StoreError(f"{out}: exists, is not empty and is not a token store; choose another output directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the store is incomplete until finalize ends
    (out / "shards").mkdir(exist_ok=True)
    for leftover in (out / "shards").glob(".*.tmp-*"):  # half-written shards of a killed run
        shutil.rmtree(leftover)
    write_text_atomic(path, json.dumps(config, indent=1))


def preprocess(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    workers: int = 1,
    chunk_mb: float = 32,
    on_invalid: str = "error",
    min_len: int | None = None,
    max_len: int | None = None,
    dedup: bool = False,
    on_duplicate_id: str = "error",
    holdout: str | Path | None = None,
    clusters: str | Path | None = None,
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    split_seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """FASTA files -> token store at ``out``; returns the manifest (see the module docstring).

    ``workers`` parse processes (1 = parse in this process). Resumable: completed shards are kept.
    """
    if not inputs:
        raise ValueError("no input FASTA files given")
    if on_duplicate_id not in ("error", "skip"):
        raise ValueError(f"on_duplicate_id must be 'error' or 'skip', got {on_duplicate_id!r}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    paths = [Path(p).resolve() for p in inputs]
    for p in paths:
        open_fasta(p)[0].close()  # missing file / directory -> FastaFormatError before anything is written
    holdout_set = read_holdout(holdout) if holdout else None
    clusters_path = Path(clusters).resolve() if clusters else None
    if clusters_path is not None and not clusters_path.is_file():
        raise FastaFormatError(f"{clusters}: clusters file not found (MMseqs2 createtsv format: representative TAB "
                               "member)")
    out = Path(out)
    chunk_bytes = int(chunk_mb * (1 << 20))
    config = {
        "version": SHARD_VERSION,
        "inputs": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in paths],
        "chunk_bytes": chunk_bytes,
        "on_invalid": on_invalid,
    }
    requested = finalize_request(min_len, max_len, dedup, on_duplicate_id, holdout_set, valid_frac, test_frac,
                                 split_seed, clusters_path)
    finished = finished_store(out, config, requested)
    if finished is not None and not overwrite:
        return finished
    # a bad clusters file fails now, before any parsing (unknown members are found by finalize)
    cluster_table = ClusterTable.read(clusters_path) if clusters_path is not None else None
    with writing(out):  # a read-only or full place: one line naming the store
        _check_config(out, config, overwrite)
    shard_root = out / "shards"
    total = sum(p.stat().st_size for p in paths)
    summaries: dict[str, dict] = {}
    reused = 0
    t0 = time.perf_counter()
    bar = track(total=total, unit="B", unit_scale=True, desc="preprocess", disable=not progress, smoothing=0.1)
    residues = 0

    def record(summary: dict) -> None:
        nonlocal residues
        summaries[summary["name"]] = summary
        residues += summary["residues"]
        bar.set_postfix_str(f"{residues / max(time.perf_counter() - t0, 1e-9) / 1e6:.1f}M residues/s")

    pool = cf.ProcessPoolExecutor(workers) if workers > 1 else None
    if pool is not None:
        pool.submit(int).result()  # fork all workers now, before the prefetch thread exists
    pending: set[cf.Future] = set()
    done_bytes = 0
    try:
        for file_index, path in enumerate(paths):
            for block in prefetch(iter_blocks(path, chunk_bytes)):
                name = shard_name(file_index, block.index)
                existing = load_shard_summary(shard_root, name)
                if existing is not None and existing["input_bytes"] == len(block.data):
                    record(existing)
                    reused += 1
                elif pool is None:
                    record(process_block(block, file_index, str(shard_root), on_invalid))
                else:
                    pending.add(pool.submit(process_block, block, file_index, str(shard_root), on_invalid))
                    if len(pending) >= 2 * workers:
                        finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        for future in finished:
                            record(future.result())
                bar.update(done_bytes + block.raw_pos - bar.n)
            done_bytes += path.stat().st_size
            bar.update(done_bytes - bar.n)
        for future in cf.as_completed(pending):
            record(future.result())
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    ordered = [summaries[k] for k in sorted(summaries)]  # (a file without records failed in iter_blocks)
    parse_seconds = time.perf_counter() - t0
    with writing(out):
        manifest = finalize(
            out,
            ordered,
            min_len=min_len,
            max_len=max_len,
            dedup=dedup,
            on_duplicate_id=on_duplicate_id,
            holdout=holdout_set,
            valid_frac=valid_frac,
            test_frac=test_frac,
            split_seed=split_seed,
            pool=pool,
            finalize_args=requested,
            clusters=cluster_table,
        )
    if pool is not None:
        pool.shutdown()
    manifest["run"] = {
        "workers": workers,
        "shards_reused": reused,
        "parse_seconds": round(parse_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "input_bytes": total,
    }
    manifest["inputs"] = config["inputs"]
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
