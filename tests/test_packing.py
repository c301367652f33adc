"""Packed proteins (issue 32): flat token streams with cu_seqlens, per-protein attention, the packed sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from proteinperformer.data.collate import CLMCollator, MLMCollator
from proteinperformer.data.datasets import WINDOW_BITS, Examples, ProteinWindows, window_counts
from proteinperformer.data.fasta import FastaRecord
from proteinperformer.data.packing import PackedBatchSampler, PackedCollator, default_budget
from proteinperformer.data.sampling import Sampling
from proteinperformer.data.sequences import TokenizedSequences
from proteinperformer.model import ModelConfig, PerformerLM
from proteinperformer.tokenizer import Alphabet, BatchConverter
from proteinperformer.training.scoring import batch_sums, residue_table

ROOT = Path(__file__).resolve().parents[1]
PROTEINS = [("a", "MKTAYIAKQR"), ("b", "GSHMLE"), ("c", "MADEEKLPPGWEKRMSRSSGRVYYFNHITNASQW"), ("d", "MW")]


def _model(attention: str, kernel: str, causal: bool, positions: str = "learned", **extra) -> PerformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, num_features=16, attention=attention, kernel=kernel,
                      causal=causal, positions=positions, max_positions=64, **extra)
    return PerformerLM(cfg).eval()


def _pack(proteins) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Each protein framed by BatchConverter, back to back: tokens (1, T), cu_seqlens (n+1,), the rows alone."""
    rows = [BatchConverter(Alphabet())([p])[2] for p in proteins]
    lengths = torch.tensor([r.shape[1] for r in rows])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return torch.cat(rows, dim=1), cu, rows


METHODS = [("favor", "relu"), ("favor", "softmax"), ("exact", "relu")]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("attention", "kernel"), METHODS)
def test_packed_batch_gives_each_protein_its_logits_alone(attention: str, kernel: str, causal: bool) -> None:
    model = _model(attention, kernel, causal)
    tokens, cu, rows = _pack(PROTEINS)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)["logits"][0]
        for i, row in enumerate(rows):
            alone = model(row)["logits"][0]  # the same model: the same random features
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_restart_in_every_protein(positions: str) -> None:
    model = _model("favor", "softmax", False, positions)
    tokens, cu, rows = _pack(PROTEINS)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)["logits"][0]
        for i, row in enumerate(rows):
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], model(row)["logits"][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("attention", "kernel"), METHODS)
def test_changing_one_protein_changes_no_other(attention: str, kernel: str, causal: bool) -> None:
    model = _model(attention, kernel, causal)
    tokens, cu, _ = _pack(PROTEINS)
    changed = tokens.clone()
    changed[0, cu[1] + 1: cu[2] - 1] = 12  # protein b's residues
    with torch.no_grad():
        a, b = model(tokens, cu_seqlens=cu)["logits"][0], model(changed, cu_seqlens=cu)["logits"][0]
    inside = torch.zeros(tokens.shape[1], dtype=torch.bool)
    inside[cu[1]: cu[2]] = True
    assert torch.equal(a[~inside], b[~inside])
    assert not torch.allclose(a[inside], b[inside])


@pytest.mark.parametrize("method", ["softmax", "relu", "exact"])
def test_packed_noncausal_values_and_gradients_equal_each_document_alone(method: str, monkeypatch) -> None:
    """The batched packed paths (softmax: one fused Function per run of documents, per-document GEMMs only) give
    every document its output and its input gradients alone, float64, with a one-token document, padded keys and,
    with 64-row blocks, runs of several documents and a document longer than a block."""
    from proteinperformer.attention import exact_attention, favor_attention, gaussian_projection, noncausal

    monkeypatch.setattr(noncausal, "ROW_BLOCK_ELEMENTS", 2 * 16 * 64)  # N·rows·m: 64-row blocks, 3 runs below
    torch.manual_seed(0)
    sizes = [5, 1, 70, 9, 40, 3]
    cu = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, [8, 80, 100]] = True  # padded keys inside documents 3, 4 and 5
    P = gaussian_projection(16, 8, generator=torch.Generator().manual_seed(1)).to(torch.float64)

    def attend(q, k, v, mask, cu=None):
        if method == "exact":
            return exact_attention(q, k, v, key_padding_mask=mask, cu_seqlens=cu)
        return favor_attention(q, k, v, P, method, key_padding_mask=mask, cu_seqlens=cu)

    weight = torch.randn(1, 2, T, 8, dtype=torch.float64)
    packed = attend(q, k, v, mask, cu)
    grads = torch.autograd.grad((packed * weight).sum(), (q, k, v))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        piece = [t[:, :, a:b].detach().requires_grad_() for t in (q, k, v)]
        alone = attend(*piece, mask[:, a:b])
        torch.testing.assert_close(packed[:, :, a:b], alone, atol=1e-10, rtol=0)
        for g, ga in zip(grads, torch.autograd.grad((alone * weight[:, :, a:b]).sum(), piece), strict=True):
            torch.testing.assert_close(g[:, :, a:b], ga, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_gradients_and_bf16_autocast(causal: bool) -> None:
    """Backward runs through every packed path, and bf16 autocast agrees with each protein alone to bf16 precision."""
    model = _model("favor", "softmax", causal, token_dropout=True)
    tokens, cu, rows = _pack(PROTEINS)
    model.train()
    model(tokens, cu_seqlens=cu)["logits"].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(tokens, cu_seqlens=cu)["logits"][0].float()
        for i, row in enumerate(rows):
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], model(row)["logits"][0].float(), atol=2e-2, rtol=0)


def test_bad_cu_seqlens_are_refused() -> None:
    model = _model("favor", "relu", False)
    tokens, cu, _ = _pack(PROTEINS)
    with pytest.raises(ValueError, match="rise strictly from 0"):
        model(tokens, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="batch of 1"):
        model(tokens.repeat(2, 1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_positions"):
        long = torch.full((1, 70), 10)
        model(long, cu_seqlens=torch.tensor([0, 70], dtype=torch.int32))


# ---- data: the packed sampler, windows and collator -------------------------------------------------------------

def _lengths(n: int = 3000, seed: int = 0) -> np.ndarray:
    """UniProt-like residue counts: log-normal, median ~270, a tail past 2,000."""
    return np.clip(np.random.default_rng(seed).lognormal(np.log(270), 0.75, n), 5, 6000).astype(np.int64)


def _tokens_of(keys: np.ndarray, lengths: np.ndarray, max_len: int | None) -> np.ndarray:
    index, window = keys >> WINDOW_BITS, keys & ((1 << WINDOW_BITS) - 1)
    framed = lengths[index] + 2
    count = window_counts(framed, max_len)
    return (window + 1) * framed // count - window * framed // count


@pytest.mark.parametrize(("max_len", "budget"), [(128, 2048), (1024, 16384), (None, 8192)])
def test_packed_epoch_holds_every_window_once_within_budget_and_ranks_balanced(max_len, budget) -> None:
    lengths = _lengths()
    samplers = [PackedBatchSampler(lengths, max_len, budget, 16, 100, seed=1, rank=r, world_size=2) for r in (0, 1)]
    batches = [s.batches() for s in samplers]
    assert len(batches[0]) == len(batches[1]) == len(samplers[0])
    keys = np.concatenate([b for rank in batches for b in rank])
    assert len(keys) == len(np.unique(keys)), "a window twice in one epoch"
    tokens = [np.array([_tokens_of(b, lengths, max_len).sum() for b in rank]) for rank in batches]
    assert max(t.max() for t in tokens) <= budget
    assert sum(t.sum() for t in tokens) == lengths.sum() + 2 * len(lengths), "every token of the split, once"
    assert samplers[0].epoch_counts()["residues"] == lengths.sum()
    assert np.mean(np.concatenate(tokens)) > 0.85 * budget, "batches are near-full"
    imbalance = np.abs(tokens[0] - tokens[1]) / np.maximum(tokens[0], tokens[1])
    assert imbalance.max() <= 0.05, "the ranks of every step hold nearly the same tokens"
    assert not np.array_equal(np.concatenate(batches[0]), np.concatenate(_with_epoch(samplers[0], 1).batches()))


def _with_epoch(sampler: PackedBatchSampler, epoch: int) -> PackedBatchSampler:
    sampler.set_epoch(epoch)
    return sampler


def test_packed_sampler_resumes_mid_epoch_and_samples_clusters() -> None:
    lengths = _lengths(800)
    straight = [b for b in PackedBatchSampler(lengths, 128, 2048, 8, 10, seed=3)]
    resumed = PackedBatchSampler(lengths, 128, 2048, 8, 10, seed=3)
    resumed.load_state_dict({"epoch": 0, "batches": 7})
    assert list(resumed) == straight[7:] and len(resumed) == len(straight)
    starts = np.arange(0, 801, 4)  # 200 clusters of 4 members
    sampler = PackedBatchSampler(lengths, 128, 2048, 8, 10, seed=3, cluster_starts=starts)
    members = np.unique(np.concatenate(sampler.batches()) >> WINDOW_BITS)
    assert len(members) == 200 and len(np.unique(members // 4)) == 200, "one member of every cluster"


def test_packed_collator_batch_equals_each_protein_in_a_batch_of_its_own() -> None:
    """The collated stream holds each window's MLM masks / CLM shift as a batch of that window alone does, and the
    model gives the packed batch the loss sums of those batches."""
    alphabet = Alphabet()
    records = [FastaRecord(f"p{i}", f"p{i}", s) for i, (_, s) in enumerate(PROTEINS)]
    seqs = TokenizedSequences.from_records(records, alphabet)
    windows = ProteinWindows(seqs, alphabet, max_len=16, seed=0)
    sampler = PackedBatchSampler(seqs.lengths, 16, 4096, 4, 1, seed=0)
    (batch,) = list(sampler)
    items = [windows[key] for key in batch]
    for index, row in enumerate(_pack(PROTEINS)[2]):  # the windows of a protein join to its framed tokens
        keys = sorted(k for _, k in batch if k >> WINDOW_BITS == index)
        assert torch.equal(torch.cat([windows[(0, k)]["tokens"] for k in keys]), row[0])
        assert all(len(windows[(0, k)]["tokens"]) <= 16 for k in keys)
    table = residue_table(alphabet, 32)
    for task, collator, causal in (("mlm", MLMCollator(alphabet, 0.3), False), ("clm", CLMCollator(alphabet), True)):
        packed, alone = PackedCollator(collator)(items), [collator([item]) for item in items]
        assert torch.equal(packed["input_ids"][0], torch.cat([a["input_ids"][0] for a in alone])), task
        assert torch.equal(packed["labels"][0], torch.cat([a["labels"][0] for a in alone])), task
        assert (packed["labels"] != -100).any() and not packed["padding_mask"].any()
        assert packed["cu_seqlens"].dtype == torch.int32
        assert packed["cu_seqlens"].diff().tolist() == [a["input_ids"].shape[1] for a in alone]
        model = _model("favor", "relu", causal)
        with torch.no_grad():
            got = batch_sums(model(packed["input_ids"], cu_seqlens=packed["cu_seqlens"])["logits"], packed["labels"],
                             table)
            parts = [batch_sums(model(a["input_ids"])["logits"], a["labels"], table) for a in alone]
        for name in got:
            torch.testing.assert_close(got[name], sum(p[name] for p in parts), atol=1e-4, rtol=1e-5)


def test_packing_settings_that_cannot_work_say_which_to_change() -> None:
    lengths = _lengths(200)
    with pytest.raises(ValueError, match=r"data.toks_per_batch=512 is smaller than the longest crop data.max_len=1024"):
        PackedBatchSampler(lengths, 1024, 512)
    with pytest.raises(ValueError, match=r"protein #\d+ .*more than data.toks_per_batch=1024 with cropping off"):
        PackedBatchSampler(lengths, None, 1024)
    with pytest.raises(ValueError, match="data.packing=true .* data.mode=concat"):
        Examples(mode="concat", packing=True)
    with pytest.raises(ValueError, match="unset data.bucketing"):
        Sampling(bucketing=True, packing=True)
    with pytest.raises(ValueError, match="data.max_len=null .* needs data.packing=true"):
        Examples(max_len=None)
    with pytest.raises(ValueError, match="set data.toks_per_batch"):
        default_budget(None, 16, None)


def test_ddp_two_gloo_ranks_train_packed_batches_balanced_by_tokens(tmp_path) -> None:
    """2 DDP ranks (gloo, tests/ddp_train.py) train packed CLM batches: the same number of steps, every step's
    streams within 5% of each other in tokens, the replicas in sync."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    packing = ["data.packing=true", "data.toks_per_batch=2048", "data.max_len=128"]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_train.py"), str(tmp_path), "32-true", *packing],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tokens = [[sum(len(row) for row in batch) for batch in r["batches"]] for r in ranks]
    assert len(tokens[0]) == len(tokens[1]) == 2 and all(len(b) == 1 for r in ranks for b in r["batches"])
    for a, b in zip(*tokens, strict=True):
        assert abs(a - b) <= 0.05 * max(a, b) and max(a, b) <= 2048
    assert ranks[0]["batches"] != ranks[1]["batches"]
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]


@pytest.mark.parametrize("name", ["paper_bid_1024", "paper_uni_1024", "paper_concat8192"])
def test_paper_presets_have_packed_twins_with_the_same_model_and_tokens_per_step(name: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        paper, packed = compose("train", [f"experiment={name}"]), compose("train", [f"experiment={name}_packed"])
    assert packed.model == paper.model and packed.task_name == paper.task_name
    assert packed.data.packing and packed.data.mode == "single" and not paper.data.packing
    per_step = paper.data.batch_size * (paper.data.chunk_len if paper.data.mode == "concat" else paper.data.max_len)
    assert packed.data.toks_per_batch == per_step and packed.data.max_len <= packed.model.config.max_positions


def test_packed_loader_from_a_token_store_trains_every_residue_of_the_split(tmp_path) -> None:
    """data=uniprot_store data.packing=true: the data module's packed batches of one epoch hold every residue of
    the training split once; without a crop, a protein over the budget is named by its accession."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import proteinperformer.data.store.preprocess as pp
    from tests.test_store import random_fasta

    random_fasta(tmp_path / "x.fasta", n=150)
    pp.preprocess([tmp_path / "x.fasta"], tmp_path / "store", chunk_mb=0.01, progress=False)
    overrides = ["data=uniprot_store", f"data.store_path={tmp_path / 'store'}", "data.packing=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[*overrides, "data.max_len=64", "data.toks_per_batch=1024"])
        uncropped = compose("train", overrides=[*overrides, "data.max_len=null", "data.toks_per_batch=300"])
    dm = instantiate(cfg.data, task="mlm")
    dm.setup()
    residues = 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 1024
        assert int(batch["cu_seqlens"][-1]) == batch["input_ids"].shape[1]
        ids = batch["input_ids"]
        residues += int(((ids != dm.alphabet.cls_idx) & (ids != dm.alphabet.eos_idx)).sum())
    assert residues == int(np.sum(dm.splits["train"].lengths))
    dm = instantiate(uncropped.data, task="mlm")
    dm.setup()
    with pytest.raises(ValueError, match=r"protein #\d+ \(P\d{5}\) .* data.toks_per_batch=300"):
        dm.train_dataloader()


def test_token_dropout_counts_masks_per_protein() -> None:
    """ESM-2's token dropout rescales by each protein's own <mask> share, packed as alone."""
    model = _model("favor", "relu", False, "rotary", token_dropout=True)
    tokens, cu, rows = _pack(PROTEINS)
    mask_idx = model.alphabet.mask_idx
    rows[2][0, 3:9] = mask_idx  # protein c: 6 of its 34 residues masked, the others none
    tokens = torch.cat(rows, dim=1)
    with torch.no_grad():
        packed = model(tokens, cu_seqlens=cu)["logits"][0]
        for i, row in enumerate(rows):
            torch.testing.assert_close(packed[cu[i]: cu[i + 1]], model(row)["logits"][0], atol=1e-5, rtol=1e-5)


def test_pp_train_refuses_packing_settings_in_one_line(tmp_path) -> None:
    """What pp-train turns into `error: ...` (a ValueError, not Hydra's InstantiationException), before training."""
    from proteinperformer.training.train import train
    from tests.conftest import tiny_config

    cases = {"data.mode=concat": "cannot be combined with data.mode=concat",
             "data.max_len=null": "learned positions .* set data.max_len or model.config.positions=rotary"}
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            train(tiny_config(tmp_path, ["data.packing=true", "data.toks_per_batch=50000", override]))


def test_a_pool_with_fewer_windows_than_ranks_gives_every_rank_a_batch() -> None:
    samplers = [PackedBatchSampler(np.array([50, 60, 70]), 128, 1024, 1, 1, rank=r, world_size=2) for r in (0, 1)]
    batches = [s.batches() for s in samplers]
    assert len(batches[0]) == len(batches[1]) == 3 and all(len(b) for rank in batches for b in rank)
    assert set((np.concatenate(batches[0]) >> WINDOW_BITS).tolist()) == {0, 1, 2}  # one pool per protein
