import numpy as np
import pytest
import torch

from proteinperformer.data import (
    IGNORE_INDEX,
    CLMCollator,
    ConcatChunkDataset,
    EpochShuffleSampler,
    MLMCollator,
    SingleSequenceDataset,
    TokenizedSequences,
    assign_split,
)
from proteinperformer.data.datamodule import ProteinDataModule
from proteinperformer.data.fasta import FastaRecord
from proteinperformer.tokenizer import Alphabet

alphabet = Alphabet()


def make_sequences(n=50, seed=0, lo=5, hi=300):
    rng = np.random.default_rng(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    records = [FastaRecord(f"S{i}", f"S{i}", "".join(rng.choice(list(letters), rng.integers(lo, hi))))
               for i in range(n)]
    return TokenizedSequences.from_records(records, alphabet), records


def test_mlm_masking_rates_and_specials_never_masked():
    seqs, _ = make_sequences(200)
    ds = SingleSequenceDataset(seqs, alphabet, max_len=512)
    items = [ds[(0, i)] for i in range(len(ds))]
    batch = MLMCollator(alphabet)(items)
    tokens = torch.nn.utils.rnn.pad_sequence([it["tokens"] for it in items], batch_first=True)
    residue = alphabet.is_residue(tokens)
    selected = batch["labels"] != IGNORE_INDEX
    n_res, n_sel = residue.sum().item(), selected.sum().item()
    assert not (selected & ~residue).any(), "special tokens or padding were selected for masking"
    assert abs(n_sel / n_res - 0.15) < 0.01
    assert (batch["labels"][selected] == tokens[selected]).all()
    inp = batch["input_ids"][selected]
    frac_mask = (inp == alphabet.mask_idx).float().mean().item()
    frac_kept = (inp == tokens[selected]).float().mean().item()
    # a random replacement can coincide with the original residue (1/20 of the 10%)
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_kept - (0.1 + 0.1 / 20)) < 0.015
    assert alphabet.is_residue(inp[inp != alphabet.mask_idx]).all()
    assert (batch["input_ids"][~selected] == tokens[~selected]).all()
    assert (batch["padding_mask"] == (tokens == alphabet.padding_idx)).all()


def test_masking_is_a_function_of_the_example_seed():
    seqs, _ = make_sequences(8)
    ds = SingleSequenceDataset(seqs, alphabet, max_len=64)
    a = MLMCollator(alphabet)([ds[(3, i)] for i in range(8)])
    b = MLMCollator(alphabet)([ds[(3, i)] for i in reversed(range(8))])
    assert torch.equal(a["labels"][0][: len(ds[(3, 0)]["tokens"])], b["labels"][7][: len(ds[(3, 0)]["tokens"])])
    c = MLMCollator(alphabet)([ds[(4, i)] for i in range(8)])
    assert not torch.equal(a["labels"], c["labels"]), "a new epoch must draw new masks"


def test_clm_shift_and_padding():
    batch = CLMCollator(alphabet)([{"tokens": torch.tensor([1, 5, 6, 2]), "seed": 0},
                                   {"tokens": torch.tensor([1, 7, 2]), "seed": 0}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, IGNORE_INDEX]]


def test_single_dataset_crops_to_max_len_deterministically():
    seqs, records = make_sequences(20, lo=200, hi=300)
    ds = SingleSequenceDataset(seqs, alphabet, max_len=50)
    item = ds[(2, 5)]["tokens"]
    assert len(item) == 50 and alphabet.decode(item) in records[5].sequence
    assert torch.equal(item, ds[(2, 5)]["tokens"])
    starts = {records[5].sequence.index(alphabet.decode(ds[(e, 5)]["tokens"])) for e in range(20)}
    assert len(starts) > 5, "random crop should move between epochs"
    ev = SingleSequenceDataset(seqs, alphabet, max_len=50, random_crop=False)
    first = ev[(7, 5)]["tokens"]  # the evaluation window: the real N-terminus, no C-terminus
    assert first[0] == alphabet.cls_idx and alphabet.is_residue(first[1:]).all()
    assert alphabet.decode(first) == records[5].sequence[:49]


@pytest.mark.parametrize("collator", [MLMCollator, CLMCollator])
def test_crops_mark_only_real_protein_ends(collator):
    """64-token windows of 900-residue proteins: <cls> only on windows that start at the first residue, <eos> only
    on windows that reach the last one (measured before the fix: 100% and 100%); short proteins stay whole."""
    seqs, records = make_sequences(200, seed=1, lo=900, hi=901)
    ds = SingleSequenceDataset(seqs, alphabet, max_len=64)
    keys = [(e, i) for e in range(3) for i in range(len(ds))]
    windows = [ds[key]["tokens"] for key in keys]
    for w, (_, i) in zip(windows, keys, strict=True):
        seq, text = records[i].sequence, alphabet.decode(w)
        assert text in seq and len(w) == 64 and alphabet.is_residue(w[1:-1]).all()
        assert w[0] != alphabet.cls_idx or seq.startswith(text), "<cls> on a window that misses the N-terminus"
        assert w[-1] != alphabet.eos_idx or seq.endswith(text), "<eos> on a window that misses the C-terminus"
    starts = sum(int(w[0] == alphabet.cls_idx) for w in windows) / len(windows)
    ends = sum(int(w[-1] == alphabet.eos_idx) for w in windows) / len(windows)
    assert starts < 0.02 and ends < 0.02  # 1 / 839 window positions each
    batch = collator(alphabet)([{"tokens": w, "seed": 0} for w in windows[:64]])
    assert not (batch["input_ids"] == alphabet.eos_idx).any() or collator is MLMCollator
    assert (batch["labels"] == alphabet.eos_idx).float().mean() < 0.01
    short, short_records = make_sequences(50, seed=2, lo=5, hi=60)
    for i in range(len(short)):
        item = SingleSequenceDataset(short, alphabet, max_len=64)[(0, i)]["tokens"]
        assert item[0] == alphabet.cls_idx and item[-1] == alphabet.eos_idx
        assert alphabet.decode(item) == short_records[i].sequence
    # every window start is reachable, the two ends included
    tiny, tiny_records = make_sequences(1, seed=3, lo=10, hi=11)
    seen = {alphabet.decode(SingleSequenceDataset(tiny, alphabet, max_len=5)[(e, 0)]["tokens"], keep_special=True)
            for e in range(300)}
    framed = "^" + tiny_records[0].sequence + "$"
    expected = {framed[s:s + 5].replace("^", "<cls>").replace("$", "<eos>") for s in range(len(framed) - 4)}
    assert seen == expected


def test_concat_chunks_carry_no_fake_ends():
    """Concatenated mode: a chunk boundary adds no marker; each <eos> is the end of a whole protein."""
    seqs, records = make_sequences(40, lo=100, hi=400)
    ds = ConcatChunkDataset(seqs, alphabet, chunk_len=64, seed=0)
    ends = {r.sequence for r in records}
    for i in range(len(ds)):
        chunk = ds[i]["tokens"]
        assert not (chunk == alphabet.cls_idx).any()
    stream = torch.cat([ds[i]["tokens"] for i in range(len(ds))])
    pieces = alphabet.decode(stream, keep_special=True).split("<eos>")
    assert set(pieces[:-1]) == ends


def test_concat_chunks_lose_nothing_and_keep_separators():
    seqs, records = make_sequences(60)
    ds = ConcatChunkDataset(seqs, alphabet, chunk_len=256, seed=3)
    stream = torch.cat([ds[i]["tokens"] for i in range(len(ds))])
    assert all(len(ds[i]["tokens"]) == 256 for i in range(len(ds)))
    total = int(seqs.lengths.sum()) + len(seqs)
    assert len(ds) == -(-total // 256)
    assert (stream[total:] == alphabet.padding_idx).all() and (stream[:total] != alphabet.padding_idx).all()
    pieces = alphabet.decode(stream[:total], keep_special=True).split("<eos>")
    assert pieces[-1] == "" and len(pieces) == len(records) + 1
    assert sorted(pieces[:-1]) == sorted(r.sequence for r in records)
    assert [records[i].sequence for i in ds.order] == pieces[:-1]


def test_split_is_deterministic_and_independent_of_other_data():
    accs = [f"P{i:05d}" for i in range(20000)]
    splits = [assign_split(a) for a in accs]
    assert splits == [assign_split(a) for a in reversed(accs)][::-1]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert abs(frac["valid"] - 0.05) < 0.006 and abs(frac["test"] - 0.05) < 0.006
    assert assign_split("P00001", seed=1) in ("train", "valid", "test")
    with pytest.raises(ValueError):
        assign_split("P1", valid_frac=0.6, test_frac=0.5)


def test_sampler_shards_disjointly_and_reshuffles_per_epoch():
    shards = [list(EpochShuffleSampler(103, seed=7, rank=r, world_size=4)) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for _, i in s]
    assert set(seen) == set(range(103)) and len(seen) == 104  # padded by one wrap-around item, as DDP does
    s = EpochShuffleSampler(50, seed=7)
    e0 = [i for _, i in s]
    s.set_epoch(1)
    e1 = [i for e, i in s if e == 1]
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    s.set_epoch(0)
    assert [i for _, i in s] == e0


def test_datamodule_splits_and_residue_counts(tmp_path):
    dm = ProteinDataModule.from_hparams(max_sequences=2000, valid_frac=0.1, test_frac=0.1, max_len=64, batch_size=4)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 2000 and 120 < sizes["valid"] < 280
    assert set(dm.splits["train"].ids).isdisjoint(dm.splits["valid"].ids)
    # the unigram baseline's input: Leucine is the most frequent residue (~9.6%)
    counts = dm.splits["train"].residue_counts(len(dm.alphabet))
    assert counts.sum() == dm.splits["train"].lengths.sum() and counts[alphabet.residue_ids].sum() == counts.sum()
    assert alphabet.all_toks[int(counts.argmax())] == "L" and 0.08 < counts.max() / counts.sum() < 0.12
    batch = next(iter(dm.val_dataloader()))
    sel = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][sel] == alphabet.mask_idx).all(), "evaluation masks every selected residue"
    # Lightning calls set_epoch on the validation sampler at every epoch (and after fit): the masked
    # residues must stay the same, or validation scores of different epochs are not comparable.
    loader = dm.val_dataloader()
    loader.sampler.set_epoch(3)
    later = next(iter(loader))
    assert torch.equal(later["labels"], batch["labels"]) and torch.equal(later["input_ids"], batch["input_ids"])


def test_datamodule_bucketing_covers_the_epoch_once_with_little_padding():
    def epoch_stats(bucketing: bool) -> tuple[ProteinDataModule, float]:
        dm = ProteinDataModule.from_hparams(max_sequences=1000, max_len=512, batch_size=8, bucketing=bucketing,
                                            pool_batches=20)
        dm.setup()
        real = padded = 0
        for batch in dm.train_dataloader():
            real += int((~batch["padding_mask"]).sum())
            padded += batch["padding_mask"].numel()
        return dm, 1 - real / padded

    _, plain_pad = epoch_stats(False)
    dm, bucket_pad = epoch_stats(True)
    assert bucket_pad < 0.1 < 0.3 < plain_pad, (bucket_pad, plain_pad)
    # every training sequence exactly once per epoch: the sampler's batches partition the split
    sampler = dm.train_dataloader().batch_sampler
    seen = [i for batch in sampler for _, i in batch]
    assert sorted(seen) == list(range(len(dm.splits["train"])))
    # Lightning reshuffles through batch_sampler.sampler.set_epoch (not batch_sampler.set_epoch)
    sampler.sampler.set_epoch(1)
    assert [i for batch in sampler for _, i in batch] != seen
    with pytest.raises(ValueError, match=r"bucketing \(and toks_per_batch\) applies to mode='single'"):
        ProteinDataModule.from_hparams(mode="concat", bucketing=True)


def test_eval_max_len_scores_every_crop_length_on_the_same_windows():
    """A run that trains on 32-token crops is validated on exactly the batches (windows and masks) of a run
    that trains on 64-token crops, when both set eval_max_len=64."""
    def loaders(max_len: int, eval_max_len: int | None):
        dm = ProteinDataModule.from_hparams(max_sequences=300, valid_frac=0.2, test_frac=0.1, max_len=max_len,
                                            eval_max_len=eval_max_len, batch_size=8)
        dm.setup()
        return dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()

    short_train, short_val, short_test = loaders(32, 64)
    _, long_val, long_test = loaders(64, None)
    assert max(b["input_ids"].shape[1] for b in short_train) == 32
    for ours, theirs in ((short_val, long_val), (short_test, long_test)):
        pairs = list(zip(ours, theirs, strict=True))
        assert max(a["input_ids"].shape[1] for a, _ in pairs) == 64
        for a, b in pairs:
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    _, default_val, _ = loaders(32, None)  # without eval_max_len, evaluation crops at max_len as before
    assert max(b["input_ids"].shape[1] for b in default_val) == 32


def test_eval_mask_prob_scores_every_masking_rate_on_the_same_masks():
    """Training at 30% masking and validating with eval_mask_prob=0.15 scores exactly the masks of a 15% run;
    without it, validation masks at the training rate (about twice the residues)."""
    def val_batches(mask_prob: float, eval_mask_prob: float | None):
        dm = ProteinDataModule.from_hparams(max_sequences=300, valid_frac=0.2, test_frac=0.1, max_len=64, batch_size=8,
                                            mask_prob=mask_prob, eval_mask_prob=eval_mask_prob)
        dm.setup()
        return list(dm.val_dataloader())

    fixed, reference, default = val_batches(0.3, 0.15), val_batches(0.15, None), val_batches(0.3, None)
    for a, b in zip(fixed, reference, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    masked = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in fixed)
    assert 1.6 < sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in default) / masked < 2.4


# ---- the data module from its config, and from checkpoints of before and after it had parts ------------
# datamodule_hyper_parameters of a checkpoint written before the data module had parts (conf/data/fasta.yaml with
# tests/conftest.py's TINY_OVERRIDES, as the old ProteinDataModule.__init__ saved them)
OLD_FLAT_HPARAMS = {
    "fasta_path": "data/uniprot_sample20k.fasta.gz", "task": "mlm", "mode": "single", "max_len": 96, "chunk_len": 8192,
    "batch_size": 8, "num_workers": "auto", "valid_frac": 0.1, "test_frac": 0.05, "split_seed": 0, "max_sequences": 600,
    "mask_prob": 0.15, "seed": 0, "store_path": None, "bucketing": False, "pool_batches": 100,
    "alphabet": "proteinperformer", "eval_max_len": None, "eval_mask_prob": None, "toks_per_batch": None,
    "pin_memory": None, "persistent_workers": None, "sampling": "sequence", "cache_dir": None, "store_min_mb": 256,
}
VARIANTS = {
    "default": [], "clm": ["task=clm"], "concat": ["data.mode=concat", "data.chunk_len=256"],
    "bucketing": ["data.bucketing=true"], "token-budget": ["data.toks_per_batch=600", "data.eval_max_len=64"],
    "eval-masks": ["data.eval_mask_prob=0.3", "data.mask_prob=0.2"], "paper": ["experiment=paper_uni_1024"],
    "store": ["data=uniprot_store", "data.store_path=/no/store", "task=clm", "data.sampling=cluster"],
}


def _tiny_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from tests.conftest import ROOT, TINY_OVERRIDES

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_OVERRIDES, *overrides])


def _tiny_data_config(overrides: list[str]):
    return _tiny_config(overrides).data


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_data_config_parts_are_built_from_its_flat_keys_as_old_checkpoints_are(name):
    """conf/data + conf/task write the parts as config.nested_config makes them from the flat keys (the form of
    checkpoints before the parts existed), so both build the same data module."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from proteinperformer.data.config import PARTS, FlatDataConfig, nested_config

    config = OmegaConf.to_container(_tiny_data_config(VARIANTS[name]), resolve=True)
    flat = {f.name: config[f.name] for f in fields(FlatDataConfig) if f.name in config}
    assert set(config) - set(flat) == {*PARTS, "_target_", "_recursive_"}  # every other key is a flat one
    nested = nested_config(**flat)
    assert {k: config[k] for k in PARTS} == {k: nested[k] for k in PARTS}


@pytest.mark.parametrize("name", ["default", "clm", "concat", "token-budget"])
def test_instantiating_the_data_config_gives_a_ready_datamodule(name):
    import hydra
    import pytorch_lightning as pl

    cfg = _tiny_data_config(VARIANTS[name])
    dm = hydra.utils.instantiate(cfg)
    assert isinstance(dm, pl.LightningDataModule) and isinstance(dm, ProteinDataModule)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    width = {"default": 96, "clm": 95, "concat": 256}  # max_len (CLM: inputs drop the last token), chunk_len
    assert batch["input_ids"].shape[1] == width.get(name, batch["input_ids"].shape[1])
    assert (batch["labels"] != IGNORE_INDEX).any() and set(batch) == {"input_ids", "labels", "padding_mask"}
    assert isinstance(dm.collator, CLMCollator if name == "clm" else MLMCollator)
    evaluation = next(iter(dm.val_dataloader()))
    if name != "clm":  # evaluation masks every scored residue (mask_frac 1.0, random_frac 0.0)
        sel = evaluation["labels"] != IGNORE_INDEX
        assert (evaluation["input_ids"][sel] == alphabet.mask_idx).all()
    if name == "token-budget":
        assert evaluation["input_ids"].shape[1] == 64 and dm.train_dataloader().batch_sampler.toks_per_batch == 600


def test_old_flat_checkpoint_hyper_parameters_build_the_same_datamodule():
    import hydra

    from proteinperformer.data.config import PARTS

    old = ProteinDataModule.from_hparams(**OLD_FLAT_HPARAMS)
    new = hydra.utils.instantiate(_tiny_data_config([]))
    assert {k: old.hparams[k] for k in PARTS} == {k: new.hparams[k] for k in PARTS}
    old.setup()
    new.setup()
    assert {k: v.ids for k, v in old.splits.items()} == {k: v.ids for k, v in new.splits.items()}
    for a, b in ((old.train_dataloader(), new.train_dataloader()), (old.val_dataloader(), new.val_dataloader())):
        x, y = next(iter(a)), next(iter(b))
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_saved_run_config_of_either_form_builds_the_datamodule():
    """scripts/table2.py and summarize_runs.py rescore runs from their .hydra/config.yaml (interpolations kept),
    also runs made before the data module had parts, with another evaluation masking rate."""
    from omegaconf import OmegaConf

    old_data = {**OLD_FLAT_HPARAMS, "_target_": "proteinperformer.data.datamodule.ProteinDataModule",
                "task": "${task_name}", "seed": "${seed}", "alphabet": "${model.config.alphabet}"}
    old_run = OmegaConf.create({"task_name": "mlm", "seed": 0, "model": {"config": {"alphabet": "proteinperformer"}},
                                "data": old_data})
    new_run = OmegaConf.create(OmegaConf.to_yaml(_tiny_config([])))
    built = []
    for saved in (old_run, new_run):
        saved.data.eval_mask_prob = 0.3
        dm = ProteinDataModule.from_hparams(**OmegaConf.to_container(saved.data, resolve=True))
        dm.setup()
        assert dm.eval_collator.mask_prob == 0.3 and dm.collator.mask_prob == 0.15
        built.append(dm)
    assert {k: v.ids for k, v in built[0].splits.items()} == {k: v.ids for k, v in built[1].splits.items()}


def test_checkpoint_holds_the_data_config_and_the_sampler_position_as_plain_data(tmp_path):
    """A checkpoint (read without unpickling objects) rebuilds the data module, pp-evaluate reads its split from
    it, and the train sampler's resume state is the epoch and the batches consumed."""
    import hydra
    import pytorch_lightning as pl

    from proteinperformer.checkpoints import read_torch
    from proteinperformer.evaluation.card import training_record
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path)
    dm, model = hydra.utils.instantiate(cfg.data), hydra.utils.instantiate(cfg.model, _convert_="all")
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = read_torch(tmp_path / "x.ckpt")
    assert ckpt["ProteinDataModule"] == {"epoch": 0, "batches": 3}
    again = ProteinDataModule.from_hparams(**ckpt["datamodule_hyper_parameters"])
    again.setup()
    assert {k: v.ids for k, v in again.splits.items()} == {k: v.ids for k, v in dm.splits.items()}
    assert training_record(tmp_path / "x.ckpt")["split"] == {"valid_frac": 0.1, "test_frac": 0.05, "split_seed": 0}
