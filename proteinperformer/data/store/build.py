"""Stages 1 and 2 of ``pp-preprocess``: the FASTA reader's blocks (:func:`proteinperformer.data.fasta.iter_blocks`,
read ahead in a thread) parsed and encoded by :func:`proteinperformer.data.fasta.parse_block` into one shard
directory each (see :mod:`proteinperformer.data.store.preprocess` for the whole pipeline and the layout)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from queue import Full, Queue

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from proteinperformer.data.fasta import Block, parse_block
from proteinperformer.data.store.reader import StoreError, check_shard_sizes
from proteinperformer.files import writing


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (gzip inflation releases the GIL, so
    reading and decompressing the next block overlaps with parsing the current one). Errors are re-raised."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def worker() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = queue.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------------
def crc32_of(array: np.ndarray) -> str:
    """CRC-32 of an array's bytes as 8 hex digits (integrity check, not security)."""
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B')):08x}"


def shard_name(file_index: int, chunk_index: int) -> str:
    return f"{file_index:04d}-{chunk_index:06d}"


def process_block(block: Block, file_index: int, shard_root: str, on_invalid: str) -> dict:
    """Parse one block and write it as shard ``shard_root/NAME`` (temp dir + rename); return its summary."""
    parsed = parse_block(block.data, block.path, block.first_line, on_invalid)
    name = shard_name(file_index, block.index)
    final = Path(shard_root) / name
    tmp = Path(shard_root) / f".{name}.tmp-{os.getpid()}"
    try:
        with writing(final):  # a full disk or a refused write: one line naming the shard
            return _write_shard(parsed, block, file_index, name, tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the shard is redone by the next run
        raise


def _write_shard(parsed, block: Block, file_index: int, name: str, tmp: Path, final: Path) -> dict:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    offsets = np.zeros(len(parsed.lengths) + 1, dtype=np.int64)
    np.cumsum(parsed.lengths, out=offsets[1:])
    np.save(tmp / "tokens.npy", parsed.tokens)
    np.save(tmp / "offsets.npy", offsets)
    accessions = np.array(parsed.fields["accession"], dtype=object)
    np.save(
        tmp / "acc_hash.npy",
        pd.util.hash_array(accessions, categorize=False) if len(accessions) else np.zeros(0, np.uint64),
    )
    n = len(parsed.lengths)
    meta = {name: pa.array(values, type=pa.string()) for name, values in parsed.fields.items()}
    meta["length"] = pa.array(parsed.lengths)
    meta["file"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([block.path]))
    meta["line"] = pa.array(parsed.lines)
    pq.write_table(pa.table(meta), tmp / "meta.parquet")  # pyarrow directly: 3x cheaper than via pandas
    summary = {
        "name": name,
        "file": block.path,
        "file_index": file_index,
        "chunk": block.index,
        "first_line": block.first_line,
        "input_bytes": len(block.data),
        "sequences": len(parsed.lengths),
        "residues": int(offsets[-1]),
        "counters": dict(parsed.counters),
        "skipped": parsed.skipped,
        "checksums": {"tokens.npy": crc32_of(parsed.tokens), "offsets.npy": crc32_of(offsets)},
    }
    (tmp / "shard.json").write_text(json.dumps(summary))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return summary


def load_shard_summary(shard_root: Path, name: str) -> dict | None:
    """The summary of a finished shard, or None when it is missing or damaged (truncated files: then it is
    rebuilt)."""
    path = shard_root / name / "shard.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    try:
        check_shard_sizes(shard_root.parent, [summary])
    except StoreError:
        return None
    return summary
