"""Issue 20, data at scale: computed permutations, bounded open files, manifest residue counts, token-budget
batches balanced across ranks, the loss as a mean over the global step's tokens, finished stores reused."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import proteinperformer.data.store.preprocess as pp
from proteinperformer.data.bucketing import LengthBucketBatchSampler, TokenCounts
from proteinperformer.data.datasets import EpochShuffleSampler
from proteinperformer.data.permutation import Permutation
from proteinperformer.data.store import StoreError, TokenStore
from proteinperformer.data.store.reader import streamed_residue_counts
from proteinperformer.tokenizer import Alphabet
from tests.test_store import random_fasta

ALPHABET = Alphabet()


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4099])
def test_permutation_is_a_bijection_that_depends_on_the_seed(n):
    values = Permutation(n, seed=3)[np.arange(n)]
    assert sorted(values.tolist()) == list(range(n))
    if n > 64:
        assert values.tolist() != Permutation(n, seed=4)[np.arange(n)].tolist()
        assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.1  # no visible trace of the input order
    chunked = np.concatenate([np.empty(0, np.int64), *Permutation(n, 3).chunks(1, n, 2, size=5)])
    np.testing.assert_array_equal(chunked, values[1::2])


def test_sampler_computes_only_its_share_and_resumes_exactly():
    ranks = [EpochShuffleSampler(10_001, seed=5, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    shares = [s.indices() for s in ranks]
    assert {len(x) for x in shares} == {len(ranks[0])} == {3334}
    assert set(np.concatenate(shares).tolist()) == set(range(10_001))
    ranks[1].start = 1000
    assert [i for _, i in ranks[1]] == shares[1][1000:].tolist()


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    random_fasta(root / "x.fasta", n=1500)
    pp.preprocess([root / "x.fasta"], root / "store", chunk_mb=0.004, progress=False)
    return root / "store"


def test_reader_keeps_a_bounded_number_of_shard_files_open(many_shards):
    store = TokenStore(many_shards)
    assert len(store.shards.names) > 40
    store.shards.max_open = 8
    train = store.split("train")
    fd_dir = Path(f"/proc/{os.getpid()}/fd")

    def store_files() -> int:
        return sum(str(many_shards) in os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir) if fd.isdigit()
                   and os.path.exists(fd_dir / fd))

    before = store_files()
    seqs = {i: train[i].copy() for i in range(0, len(train), 3)}
    assert len(store.shards._open) == 8
    assert store_files() - before <= 8 + 1  # the shards' token files, plus the store-wide offsets index
    for i, seq in seqs.items():  # the same residues after eviction and re-opening
        np.testing.assert_array_equal(train[i], seq)
    # the store-wide index agrees with every shard's own offsets
    for s, name in enumerate(store.shards.names):
        local = np.load(many_shards / "shards" / name / "offsets.npy")
        start = store.shards.starts[s]
        np.testing.assert_array_equal(store.shards.offsets[start : start + len(local)] - store.shards.offsets[start],
                                      local)


def test_manifest_residue_counts_equal_a_count_over_the_split(many_shards):
    store = TokenStore(many_shards)
    for split in ("train", "valid", "test"):
        part = store.split(split)
        expected = np.bincount(np.concatenate([part[i] for i in range(len(part))]), minlength=len(ALPHABET))
        np.testing.assert_array_equal(part.residue_counts(len(ALPHABET)), expected)
        sub = part.subset(range(0, len(part), 2))  # a subset streams its own count
        expected = np.bincount(np.concatenate([sub[i] for i in range(len(sub))]), minlength=len(ALPHABET))
        np.testing.assert_array_equal(sub.residue_counts(len(ALPHABET)), expected)
        np.testing.assert_array_equal(streamed_residue_counts(sub, len(ALPHABET), chunk=7), expected)


def test_finished_store_is_reused_and_older_versions_are_refused(tmp_path, monkeypatch):
    random_fasta(tmp_path / "x.fasta", n=50)
    first = pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", progress=False)
    monkeypatch.setattr(pp, "finalize", lambda *a, **k: pytest.fail("finalize reran on a finished store"))
    monkeypatch.setattr(pp, "iter_blocks", lambda *a, **k: pytest.fail("input re-read for a finished store"))
    again = pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", progress=False)
    assert again["run"]["finalize_skipped"] and again["counts"] == first["counts"]
    monkeypatch.undo()
    other = pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", valid_frac=0.2, progress=False)  # new split
    assert "finalize_skipped" not in other["run"] and other["finalize_args"]["valid_frac"] == 0.2
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1', 1))
    with pytest.raises(StoreError, match="version 1.*rerun pp-preprocess with the same arguments"):
        TokenStore(tmp_path / "s")


def lognormal_tokens(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.lognormal(5.6, 0.8, n).astype(np.int64) + 2, 1024)


def test_token_budget_batches_fit_the_budget_and_ranks_of_a_step_match_in_length():
    tokens = lognormal_tokens(6000)
    world, budget = 2, 4096
    samplers = [LengthBucketBatchSampler(tokens, 32, pool_batches=40, seed=1, rank=r, world_size=world,
                                         toks_per_batch=budget) for r in range(world)]
    per_rank = [[[i for _, i in b] for b in s] for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0])
    for batches in per_rank:
        for b in batches:
            assert len(b) * tokens[b].max() <= budget or len(b) == 1
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(seen) == set(range(6000)) and sum(seen.values()) - 6000 <= max(len(b) for b in per_rank[1])
    # the two ranks' batches of one step: similar widths (round-robin over shuffled batches gives ~3x apart)
    widths = np.array([[tokens[b].max() for b in batches] for batches in per_rank], dtype=float)
    ratio = widths.max(0) / widths.min(0)
    assert np.median(ratio) < 1.1, np.median(ratio)
    shuffled = np.random.default_rng(0).permutation(widths.ravel()).reshape(widths.shape)
    assert np.median(shuffled.max(0) / shuffled.min(0)) > 1.5  # what dealing batches at random would give
    # token counts per step are close to the budget on both ranks, so no rank waits for the other for long
    fill = np.array([[len(b) * tokens[b].max() for b in batches] for batches in per_rank]) / budget
    assert np.median(fill) > 0.85
    # resume: the rest of the epoch from a batch position, exactly
    samplers[1].start = 10
    assert [[i for _, i in b] for b in samplers[1]] == per_rank[1][10:]


def test_token_counts_are_lazy_over_a_memory_map(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 3000, 1000)
    np.save(tmp_path / "lengths.npy", lengths)
    counts = TokenCounts(np.load(tmp_path / "lengths.npy", mmap_mode="r"), max_len=1024)
    idx = np.array([5, 1, 999])
    np.testing.assert_array_equal(counts[idx], np.minimum(lengths[idx] + 2, 1024))
    a = LengthBucketBatchSampler(counts, 8, 5, seed=2)
    b = LengthBucketBatchSampler(np.minimum(lengths + 2, 1024), 8, 5, seed=2)
    assert [x for x in a] == [x for x in b]


def test_ddp_loss_is_the_mean_over_all_tokens_of_the_global_step():
    """Two ranks with 3 and 30 supervised tokens: the DDP-averaged gradient of ``global_token_mean`` equals the
    gradient of the mean NLL over all 33 tokens (the mean of per-rank means would weigh rank 0's tokens 10x)."""
    from proteinperformer.training.lm import global_token_mean

    torch.manual_seed(0)
    weight = torch.randn(5, requires_grad=True)
    nll = [(weight * torch.randn(3, 5)).sum(1) ** 2, (weight * torch.randn(30, 5)).sum(1) ** 2]
    counts = [torch.tensor(3), torch.tensor(30)]

    def all_reduce_sum(tensor, reduce_op):
        assert reduce_op == "sum"
        return sum(c.float() for c in counts)

    grads = []
    for rank in (0, 1):
        loss = global_token_mean(nll[rank].mean(), counts[rank], 2, all_reduce_sum)
        grads.append(torch.autograd.grad(loss, weight, retain_graph=True)[0])
    ddp_grad = (grads[0] + grads[1]) / 2  # what DDP's gradient all-reduce computes
    expected = torch.autograd.grad(torch.cat(nll).mean(), weight, retain_graph=True)[0]
    torch.testing.assert_close(ddp_grad, expected)
    per_rank_means = torch.autograd.grad((nll[0].mean() + nll[1].mean()) / 2, weight)[0]
    assert not torch.allclose(per_rank_means, expected)


def test_large_fasta_trains_from_a_cached_store_built_once(tmp_path, monkeypatch):
    from proteinperformer.data.datamodule import ProteinDataModule

    seqs = random_fasta(tmp_path / "big.fasta", n=400)
    in_memory = ProteinDataModule.from_hparams(fasta_path=str(tmp_path / "big.fasta"), max_len=64, batch_size=4)
    in_memory.setup()
    assert in_memory.source.cached_store() is None  # small file: read into memory
    dm = ProteinDataModule.from_hparams(fasta_path=str(tmp_path / "big.fasta"), max_len=64, batch_size=4,
                                        cache_dir=str(tmp_path / "cache"), store_min_mb=0)
    dm.prepare_data()
    dm.setup()
    store = dm.source.cached_store().path
    assert store.parent == tmp_path / "cache" and (store / "manifest.json").exists()
    for split in ("train", "valid", "test"):  # the same accession-hashed splits as the in-memory route
        assert sorted(dm.splits[split].ids) == sorted(in_memory.splits[split].ids)
        n = len(ALPHABET)  # and the same residue counts (the unigram baseline's input)
        np.testing.assert_array_equal(dm.splits[split].residue_counts(n), in_memory.splits[split].residue_counts(n))
    i = dm.splits["train"].ids.index("P00007")
    assert ALPHABET.decode(dm.splits["train"][i].tolist()) == seqs["P00007"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    # reused: a second run neither parses nor finalizes
    monkeypatch.setattr(pp, "iter_blocks", lambda *a, **k: pytest.fail("the cached store was rebuilt"))
    again = ProteinDataModule.from_hparams(fasta_path=str(tmp_path / "big.fasta"), cache_dir=str(tmp_path / "cache"),
                                           store_min_mb=0)
    again.prepare_data()
    again.setup()
    assert again.source.cached_store().path == store
    monkeypatch.undo()
    # other split options -> another store; an unwritable cache directory -> one-line error
    other = ProteinDataModule.from_hparams(fasta_path=str(tmp_path / "big.fasta"), cache_dir=str(tmp_path / "cache"),
                                           store_min_mb=0, valid_frac=0.2)
    assert other.source.cached_store().path != store
    (tmp_path / "file").write_text("")
    bad = ProteinDataModule.from_hparams(fasta_path=str(tmp_path / "big.fasta"),
                                         cache_dir=str(tmp_path / "file" / "cache"), store_min_mb=0)
    with pytest.raises(StoreError, match=r"cache directory .* is not writable .*set data.cache_dir"):
        bad.prepare_data()


def test_loader_options_turn_on_workers_pinning_and_persistence_on_gpus_only():
    from types import SimpleNamespace

    from proteinperformer.data.datamodule import ProteinDataModule

    dm = ProteinDataModule.from_hparams(num_workers="auto")
    assert dm.loader_options() == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}  # no trainer
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), num_devices=1)
    expected = min(8, len(os.sched_getaffinity(0)) - 1)
    assert dm.loader_options() == {"num_workers": expected, "pin_memory": True, "persistent_workers": expected > 0}
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=1)
    assert dm.loader_options()["num_workers"] == 0 and not dm.loader_options()["pin_memory"]
    explicit = ProteinDataModule.from_hparams(num_workers=3, pin_memory=False, persistent_workers=False)
    assert explicit.loader_options() == {"num_workers": 3, "pin_memory": False, "persistent_workers": False}
    assert ProteinDataModule.from_hparams(num_workers=2).loader_options()["persistent_workers"]  # null: on with workers
