"""pp-preprocess --clusters: whole clusters in one split, bad TSV lines named; data.sampling=cluster."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import proteinperformer.data.store.preprocess as pp
from proteinperformer.cli.preprocess import main as preprocess_main
from proteinperformer.data.cluster_sampling import ClusterSampler
from proteinperformer.data.datamodule import ProteinDataModule
from proteinperformer.data.fasta import FastaFormatError
from proteinperformer.data.store import TokenStore
from tests.test_store import random_fasta


def write_clusters(path: Path, ids: list[str], seed: int = 0) -> dict[str, str]:
    """Random clusters of 1-6 members over 80% of ``ids`` (the rest unlisted: singletons); member -> rep."""
    rng = np.random.default_rng(seed)
    listed = [i for i in ids if rng.random() < 0.8]
    member_of, lines, k = {}, [], 0
    while k < len(listed):
        size = int(rng.integers(1, 7))
        group = listed[k : k + size]
        for m in group:
            member_of[m] = group[0]
            lines.append(f"{group[0]}\t{m}\n")
        k += size
    rng.shuffle(lines)
    path.write_text("".join(lines))
    return member_of


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("clustered")
    seqs = random_fasta(root / "x.fasta", n=1200)
    member_of = write_clusters(root / "clusters.tsv", sorted(seqs))
    pp.preprocess([root / "x.fasta"], root / "store", chunk_mb=0.05, clusters=root / "clusters.tsv",
                  valid_frac=0.15, test_frac=0.15, progress=False)
    return root / "store", member_of


def test_no_cluster_is_in_two_splits_and_rows_are_grouped_by_cluster(clustered):
    store_path, member_of = clustered
    store = TokenStore(store_path)
    split_of_cluster: dict[str, set[str]] = {}
    total = 0
    for split in ("train", "valid", "test"):
        part, starts = store.split(split), store.cluster_starts(split)
        ids = part.ids
        total += len(ids)
        assert starts[0] == 0 and starts[-1] == len(ids) and np.all(np.diff(starts) > 0)
        for c in range(len(starts) - 1):
            reps = {member_of.get(a, a) for a in ids[starts[c] : starts[c + 1]]}
            assert len(reps) == 1, "one cluster per range"
            split_of_cluster.setdefault(reps.pop(), set()).add(split)
        assert store.manifest["counts"]["splits"][split]["clusters"] == len(starts) - 1
    assert total == 1200
    assert all(len(s) == 1 for s in split_of_cluster.values()), "a cluster in two splits"
    sizes = Counter(len(s) for s in split_of_cluster.values())
    assert len(split_of_cluster) == len(set(member_of.values())) + (1200 - len(member_of))  # singletons too
    counts = {s: store.manifest["counts"]["splits"][s]["sequences"] for s in ("train", "valid", "test")}
    assert 0.08 < counts["valid"] / 1200 < 0.25 and 0.08 < counts["test"] / 1200 < 0.25, (counts, sizes)


def test_cluster_sampling_draws_every_cluster_once_per_epoch(clustered):
    store_path, _ = clustered
    starts = TokenStore(store_path).cluster_starts("train")
    n_clusters = len(starts) - 1
    cluster_of = np.repeat(np.arange(n_clusters), np.diff(starts))
    members_by_epoch = []
    for epoch in range(3):
        drawn = []
        for rank in range(2):
            sampler = ClusterSampler(starts, seed=4, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            drawn += [(e, i) for e, i in sampler]
        assert {e for e, _ in drawn} == {epoch}
        clusters = Counter(cluster_of[i] for _, i in drawn)
        assert set(clusters) == set(range(n_clusters))
        assert sum(clusters.values()) == n_clusters + n_clusters % 2  # one wrapped-around item evens the ranks
        members_by_epoch.append({cluster_of[i]: i for _, i in drawn})
    big = [c for c in range(n_clusters) if starts[c + 1] - starts[c] >= 4]
    changed = sum(len({m[c] for m in members_by_epoch}) > 1 for c in big)
    assert changed > 0.6 * len(big), "the member drawn from a cluster changes between epochs"
    again = ClusterSampler(starts, seed=4, rank=1, world_size=2)
    again.set_epoch(2)
    again.start = 5
    first = ClusterSampler(starts, seed=4, rank=1, world_size=2)
    first.set_epoch(2)
    assert list(again) == list(first)[5:]  # resume mid-epoch: the same draws


def test_datamodule_samples_clusters_and_needs_a_clustered_store(clustered, tmp_path):
    store_path, _ = clustered
    dm = ProteinDataModule.from_hparams(store_path=str(store_path), sampling="cluster", batch_size=8, max_len=64)
    dm.setup()
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClusterSampler)
    assert len(loader.sampler) == TokenStore(store_path).manifest["counts"]["splits"]["train"]["clusters"]
    random_fasta(tmp_path / "y.fasta", n=30)
    pp.preprocess([tmp_path / "y.fasta"], tmp_path / "plain", progress=False)
    plain = ProteinDataModule.from_hparams(store_path=str(tmp_path / "plain"), sampling="cluster")
    with pytest.raises(Exception, match="made without clusters.*--clusters"):
        plain.setup()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("P00000\tP00000\nP00001\n", r"clusters.tsv:2: expected 2 tab-separated columns"),
        ("P00000\tP00000\nP00001\tP00001\tx\n", r"clusters.tsv:2: expected 2 tab-separated columns"),
        ("P00000\tP00000\nP00000\tP00001\nP00002\tP00001\n", r"clusters.tsv:3: member already listed at line 2"),
        ("P00000\tP00000\nP00000\tQ99999\n", r"clusters.tsv:2: member not in the input FASTA"),
    ],
)
def test_bad_clusters_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    random_fasta(tmp_path / "x.fasta", n=20)
    (tmp_path / "clusters.tsv").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        preprocess_main([str(tmp_path / "x.fasta"), "--out", str(tmp_path / "s"), "--clusters",
                         str(tmp_path / "clusters.tsv"), "--quiet"])
    err = str(exit_info.value.code)  # run_command exits with the one-line message (status 1)
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_missing_clusters_file_fails_before_parsing(tmp_path):
    random_fasta(tmp_path / "x.fasta", n=5)
    with pytest.raises(FastaFormatError, match="clusters file not found"):
        pp.preprocess([tmp_path / "x.fasta"], tmp_path / "s", clusters=tmp_path / "none.tsv", progress=False)
    assert not (tmp_path / "s").exists()
