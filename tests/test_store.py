"""Token store reader, resumable preprocessing, splits/dedup/holdout, and rank x worker sampling."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import proteinperformer.data.store.preprocess as pp
from proteinperformer.data.bucketing import LengthBucketBatchSampler, padding_fraction
from proteinperformer.data.datasets import ConcatChunkDataset, EpochShuffleSampler, SingleSequenceDataset
from proteinperformer.data.splits import assign_split
from proteinperformer.data.store import StoreError, TokenStore, open_store
from proteinperformer.data.store.finalize import split_codes
from proteinperformer.tokenizer import Alphabet

ALPHABET = Alphabet()
AA = list("ACDEFGHIKLMNPQRSTVWY")


def random_fasta(path: Path, n: int = 300, seed: int = 0, duplicates: int = 0) -> dict[str, str]:
    """Write n unique random sequences (plus ``duplicates`` exact copies under new ids); return id -> seq."""
    rng = np.random.default_rng(seed)
    seqs = {f"P{i:05d}": "".join(rng.choice(AA, int(rng.integers(5, 400)))) for i in range(n)}
    for j in range(duplicates):
        seqs[f"D{j:05d}"] = seqs[f"P{j:05d}"]
    path.write_text("".join(f">{k} some description\n{v}\n" for k, v in seqs.items()))
    return seqs


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    random_fasta(root / "x.fasta", n=300)
    pp.preprocess([root / "x.fasta"], root / "store", chunk_mb=0.01, progress=False)
    return root / "store"


def test_store_reads_back_every_sequence_in_its_split(store_path, tmp_path):
    seqs = random_fasta(tmp_path / "same.fasta", n=300)  # same seed -> same content
    store = TokenStore(store_path)
    assert len(store.manifest["shards"]) > 3
    total = 0
    for split in ("train", "valid", "test"):
        part = store.split(split)
        for i, acc in enumerate(part.ids):
            assert assign_split(acc) == split
            assert ALPHABET.decode(part[i].tolist()) == seqs[acc]
            assert part.lengths[i] == len(seqs[acc])
        total += len(part)
    assert total == 300 and len(store.split("ood")) == 0
    sub = store.split("train").subset([5, 2])
    assert sub.ids == [store.split("train").ids[5], store.split("train").ids[2]]
    np.testing.assert_array_equal(sub[1], store.split("train")[2])


def test_vectorised_split_codes_agree_with_assign_split():
    rng = np.random.default_rng(0)
    accessions = [
        f"{a}{n}" for a, n in zip(rng.choice(list("OPQABX"), 20_000), rng.integers(0, 10**6, 20_000), strict=True)
    ]
    for valid, test, seed in [(0.05, 0.05, 0), (0.3, 0.2, 7), (0.0, 0.5, 1)]:
        codes = split_codes(accessions, valid, test, seed)
        names = np.array(["train", "valid", "test"])[codes]
        assert names.tolist() == [assign_split(a, valid, test, seed) for a in accessions]


def test_store_pickles_without_its_memmaps(store_path):
    part = open_store(store_path, "train")
    _ = part[0], part.ids
    blob = pickle.dumps(part)
    assert len(blob) < 50_000  # row index + lengths, not the token data
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[7], part[7])


def test_missing_manifest_and_missing_split_are_refused(store_path, tmp_path):
    with pytest.raises(StoreError, match="no such token store"):
        TokenStore(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(StoreError, match="no manifest.json.*rerun pp-preprocess"):
        open_store(tmp_path / "half")
    with pytest.raises(StoreError, match="no split 'tran'"):
        open_store(store_path, "tran")


def test_verify_detects_a_corrupted_shard(tmp_path):
    random_fasta(tmp_path / "x.fasta", n=20)
    pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", progress=False)
    store = TokenStore(tmp_path / "s")
    store.verify()
    tokens = tmp_path / "s" / "shards" / "0000-000000" / "tokens.npy"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1
    tokens.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        store.verify()


def test_interrupted_run_resumes_keeping_completed_shards(tmp_path, monkeypatch):
    random_fasta(tmp_path / "x.fasta", n=300)
    reference = pp.preprocess([tmp_path / "x.fasta"], tmp_path / "ref", chunk_mb=0.01, progress=False)
    real = pp.process_block
    calls = []

    def crash_on_third(block, *args, **kwargs):
        calls.append(block.index)
        if block.index == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(block, *args, **kwargs)

    monkeypatch.setattr(pp, "process_block", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", chunk_mb=0.01, progress=False)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == ["0000-000000", "0000-000001"]
    monkeypatch.setattr(pp, "process_block", real)
    manifest = pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", chunk_mb=0.01, progress=False)
    assert manifest["run"]["shards_reused"] == 2
    assert manifest["shards"] == reference["shards"] and manifest["counts"] == reference["counts"]
    with pytest.raises(StoreError, match="other inputs or parsing arguments"):
        pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", chunk_mb=0.02, progress=False)


def test_dedup_length_filter_and_holdout(tmp_path):
    seqs = random_fasta(tmp_path / "x.fasta", n=200, duplicates=10)
    (tmp_path / "holdout.txt").write_text("# OOD families\nP00100\nP00101\nNOT_THERE\n")
    manifest = pp.preprocess(
        [tmp_path / "x.fasta"],
        tmp_path / "s",
        dedup=True,
        min_len=10,
        max_len=350,
        holdout=tmp_path / "holdout.txt",
        progress=False,
    )
    lengths = {k: len(v) for k, v in seqs.items()}
    # the length filter runs first, then dedup among the survivors
    assert manifest["counters"]["duplicate_sequence"] == sum(10 <= v <= 350 for k, v in lengths.items() if k[0] == "D")
    assert manifest["counters"]["too_short"] == sum(v < 10 for v in lengths.values())
    assert manifest["counters"]["too_long"] == sum(v > 350 for v in lengths.values())
    assert manifest["counts"]["holdout_not_found"] == 1
    store = TokenStore(tmp_path / "s")
    ood = set(store.split("ood").ids)
    assert ood == {k for k in ("P00100", "P00101") if 10 <= lengths[k] <= 350}
    kept = [acc for s in store.split_names for acc in store.split(s).ids]
    assert len(kept) == len(set(kept)) == manifest["counts"]["sequences_kept"]
    assert not any(k.startswith("D") for k in kept)  # the copies come later in the file: first kept
    meta = store.metadata()
    assert Counter(meta["status"])["duplicate_sequence"] == manifest["counters"]["duplicate_sequence"] and meta[
        "split"
    ].isna().sum() == len(meta) - len(kept)


# ---- sampling across ranks and workers ----------------------------------------------------------------
class Keyed(Dataset):
    """Dataset wrapper returning (key, tokens) so a test can see which example each worker read."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return key, self.dataset[key]["tokens"]


def read_epoch(dataset, world_size: int, epoch: int, workers: int, bucketed: bool = False) -> list[tuple]:
    out = []
    for rank in range(world_size):
        if bucketed:
            lengths = np.minimum(np.asarray(dataset.sequences.lengths) + 2, dataset.max_len)
            sampler = LengthBucketBatchSampler(lengths, 4, pool_batches=3, seed=1, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            loader = DataLoader(Keyed(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=list)
        else:
            sampler = EpochShuffleSampler(len(dataset), seed=1, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            loader = DataLoader(Keyed(dataset), batch_size=4, sampler=sampler, num_workers=workers, collate_fn=list)
        out.extend(item for batch in loader for item in batch)
    return out


@pytest.mark.parametrize("mode", ["single", "concat", "bucketed"])
def test_each_epoch_reads_every_example_once_across_ranks_and_workers(store_path, mode):
    seqs = open_store(store_path, "train").subset(range(240))  # divisible by world size and batch size
    if mode == "concat":
        dataset = ConcatChunkDataset(seqs, ALPHABET, chunk_len=256, seed=0)
    else:
        dataset = SingleSequenceDataset(seqs, ALPHABET, max_len=64, seed=0)
    n = len(dataset)
    orders = []
    for epoch in (0, 1):
        items = read_epoch(dataset, world_size=2, epoch=epoch, workers=2, bucketed=mode == "bucketed")
        counts = Counter(index for (_, index), _ in items)
        if mode == "concat" and n % 2:
            assert sum(counts.values()) == n + 1  # one chunk repeated to even out the ranks
        else:
            assert sum(counts.values()) == n
        assert set(counts) == set(range(n))
        assert all(e == epoch for (e, _), _ in items)
        for key, tokens in items[:20]:
            torch.testing.assert_close(tokens, dataset[key]["tokens"])  # read in a worker == read here
        orders.append([index for (_, index), _ in items])
    assert orders[0] != orders[1]  # reshuffled per epoch
    again = read_epoch(dataset, world_size=2, epoch=1, workers=0, bucketed=mode == "bucketed")
    assert [index for (_, index), _ in again] == orders[1]  # same seed and epoch -> same order


def test_bucketed_batches_pad_less_and_shard_by_rank():
    rng = np.random.default_rng(0)
    tokens = np.minimum(rng.lognormal(5.8, 0.7, 5000).astype(int) + 2, 1024)
    sampler = LengthBucketBatchSampler(tokens, batch_size=16, pool_batches=50, seed=0)
    plain = np.array_split(rng.permutation(5000), 5000 // 16)
    bucketed = padding_fraction(sampler.global_batches(), tokens)
    assert bucketed < 0.05 < 0.3 < padding_fraction(plain, tokens)
    ranks = [LengthBucketBatchSampler(tokens, 16, 50, seed=0, rank=r, world_size=3) for r in range(3)]
    per_rank = [list(s) for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and all(len(b) == len(ranks[0]) for b in per_rank)
    seen = Counter(i for batches in per_rank for batch in batches for _, i in batch)
    assert set(seen) == set(range(5000)) and sum(seen.values()) - 5000 < 3 * 16  # only wrap-around padding
    dropped = LengthBucketBatchSampler(tokens, 16, 50, seed=0, rank=0, world_size=3, drop_last=True)
    assert len(list(dropped)) == len(dropped) and all(len(b) == 16 for b in dropped)


@pytest.mark.parametrize("mode", ["single", "concat"])
def test_datamodule_reads_splits_from_a_store(store_path, mode):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose("train", overrides=["data=uniprot_store", f"data.store_path={store_path}", f"data.mode={mode}"])
    dm = instantiate(cfg.data, task="mlm", batch_size=4, chunk_len=512)
    dm.setup()
    store = TokenStore(store_path)
    assert {k: len(v) for k, v in dm.splits.items()} == {k: len(store.split(k)) for k in ("train", "valid", "test")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    width = batch["input_ids"].shape[1]
    assert width == 512 if mode == "concat" else 3 <= width <= 1024
