"""Variant-effect scoring (pp-score): every strategy equals a loop over single sequences, reproduces ESM-1v's
predict.py on a random-init fair-esm ESM-2, baselines, every CSV row kept, clear errors naming the CSV line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from proteinperformer.checkpoints import load_model, save_checkpoint
from proteinperformer.cli.score import main
from proteinperformer.inference.score import (
    VariantError,
    blosum_scores,
    parse_variant,
    score_variants,
    unigram_scores,
)
from proteinperformer.model import ModelConfig, PerformerLM
from tests.test_esm_import import _perturb, write_fair_esm

WT = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
VARIANTS = ["M1A", "K2R", "T3T", "A4W:Y5F", "K2R:Q9E:V32L", "Q33P", "Y5F"]


def tiny_model(attention: str = "exact", positions: str = "learned", seed: int = 0) -> PerformerLM:
    torch.manual_seed(seed)
    model = PerformerLM(ModelConfig(dim=32, depth=2, heads=4, ff_dim=64, max_positions=64, attention=attention,
                                    positions=positions, num_features=16, kernel="softmax")).eval()
    _perturb(model, seed, 0.3)
    return model


def brute_force(model, sequence: str, variants: list[str], strategy: str, offset: int = 1) -> np.ndarray:
    """One forward pass per (sequence, masked position), nothing batched."""
    alphabet = model.alphabet

    def log_probs(seq: str, masked: int | None) -> torch.Tensor:
        tokens = alphabet.get_batch_converter()([("x", seq)])[2]
        if masked is not None:
            tokens[0, 1 + masked] = alphabet.mask_idx
        with torch.no_grad():
            return torch.log_softmax(model(tokens)["logits"][0].double(), -1)

    out = []
    for v in variants:
        subs = parse_variant(v, sequence, offset)
        if strategy == "pseudo-ll":
            mutant = list(sequence)
            for i, _, mt in subs:
                mutant[i] = mt
            out.append(sum(float(log_probs("".join(mutant), i)[1 + i, alphabet.tok_to_idx[a]])
                           for i, a in enumerate(mutant)))
            continue
        total = 0.0
        for i, wt, mt in subs:
            lp = log_probs(sequence, None if strategy == "wt-marginals" else i)[1 + i]
            total += float(lp[alphabet.tok_to_idx[mt]] - lp[alphabet.tok_to_idx[wt]])
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("attention,positions", [("exact", "learned"), ("favor", "sinusoidal")])
@pytest.mark.parametrize("strategy", ["wt-marginals", "masked-marginals", "pseudo-ll"])
def test_each_strategy_equals_a_loop_over_single_sequences(strategy, attention, positions):
    model = tiny_model(attention, positions)
    variants = VARIANTS[:4] if strategy == "pseudo-ll" else VARIANTS  # the loop takes L passes per mutant
    got = score_variants(model, WT, variants, strategy=strategy, toks_per_batch=200)  # several batches
    want = brute_force(model, WT, variants, strategy)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert got[2] == 0 or strategy == "pseudo-ll"  # a synonymous change scores 0 under the marginals
    assert np.ptp(got) > 0.1  # the scores are not all alike: the comparison could fail


def test_offset_and_none_rows():
    model = tiny_model()
    shifted = [f"{v[0]}{int(v[1:-1]) + 23}{v[-1]}" for v in ("M1A", "K2R")]
    a = score_variants(model, WT, ["M1A", None, "K2R"])
    b = score_variants(model, WT, [shifted[0], None, shifted[1]], offset_idx=24)
    assert np.isnan(a[1]) and np.isnan(b[1])
    np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])


def test_bad_variants_raise_naming_the_variant():
    model = tiny_model()
    with pytest.raises(VariantError, match=r"variant 1 \('A2R'\): A2R says wild type A at position 2, but the "
                                           r"sequence has K"):
        score_variants(model, WT, ["M1A", "A2R"])
    for bad, msg in (("M0A", "outside the sequence"), ("MA", "not a substitution"), ("K2R:K2A", "mutated twice"),
                     ("K2J", "not one of the 20"), ("", "empty mutation")):
        with pytest.raises(VariantError, match=msg):
            parse_variant(bad, WT)
    causal = PerformerLM(ModelConfig(dim=16, depth=1, heads=2, ff_dim=32, causal=True, attention="exact"))
    with pytest.raises(ValueError, match="needs a masked LM"):
        score_variants(causal, WT, ["M1A"])
    with pytest.raises(ValueError, match="at most 62 .* use --attention favor"):
        score_variants(model, WT * 2, ["M1A"])


def test_baselines():
    subs = [parse_variant(v, WT) for v in ("M1A", "T3T", "A4W:Y5F")] + [None]
    blosum = blosum_scores(subs)
    np.testing.assert_array_equal(blosum[:3], [-1, 5, -3 + 3])  # BLOSUM62: M/A -1, T/T 5, A/W -3, Y/F 3
    assert np.isnan(blosum[3])
    freqs = {a: 0.05 for a in "ACDEFGHIKLMNPQRSTVWY"} | {"A": 0.1, "M": 0.025}
    np.testing.assert_allclose(unigram_scores(subs, freqs)[:3], [np.log(4), 0, np.log(0.5)])


def test_unigram_log_ratio_uses_the_baselines_frequencies(tmp_path):
    from proteinperformer.data.unigram import fasta_unigram_frequencies

    fasta = tmp_path / "u.fasta"
    fasta.write_text(">a\nAAAAKK\n>b\nWWx*\n")  # A 4, K 2, W 2, X 1 (lower case read, terminal * dropped)
    freqs = fasta_unigram_frequencies(fasta)
    assert len(freqs) == 25 and sum(freqs.values()) == pytest.approx(1)  # add-one over the 25 residue letters
    assert freqs["A"] == pytest.approx(5 / 34) and freqs["X"] == pytest.approx(2 / 34) and freqs["M"] == 1 / 34
    subs = [parse_variant(v, WT) for v in ("A4K", "K2W", "M1A:K2W")]
    np.testing.assert_allclose(unigram_scores(subs, freqs), [np.log(3 / 5), 0, np.log(5) + 0])
    fasta.write_text(">a\nAK-K\n")
    with pytest.raises(ValueError, match=r"u.fasta:1: record 'a' invalid character '-' at residue 3 \(line 2\)"):
        fasta_unigram_frequencies(fasta)


# ---- a random-init fair-esm ESM-2: reproduce ESM-1v's predict.py ----------------------------------
def predict_py_scores(esm_model, alphabet, sequence: str, variants: list[str], strategy: str) -> np.ndarray:
    """ESM-1v examples/variant-prediction/predict.py (label_row, its masked-marginals loop over every token), and
    the pseudo-log-likelihood with each residue's own letter (predict.py's compute_pppl reads it off by one)."""
    _, _, tokens = alphabet.get_batch_converter()([("protein1", sequence)])

    def lp(toks):
        with torch.no_grad():
            return torch.log_softmax(esm_model(toks)["logits"], dim=-1)

    if strategy == "wt-marginals":
        token_probs = lp(tokens)
    elif strategy == "masked-marginals":
        rows = []
        for i in range(tokens.size(1)):
            masked = tokens.clone()
            masked[0, i] = alphabet.mask_idx
            rows.append(lp(masked)[:, i])
        token_probs = torch.cat(rows, dim=0).unsqueeze(0)
    out = []
    for v in variants:
        if strategy == "pseudo-ll":
            subs = parse_variant(v, sequence)
            mutant = list(sequence)
            for i, _, mt in subs:
                mutant[i] = mt
            _, _, mt_tokens = alphabet.get_batch_converter()([("protein1", "".join(mutant))])
            total = 0.0
            for i in range(1, len(mutant) + 1):
                masked = mt_tokens.clone()
                masked[0, i] = alphabet.mask_idx
                total += lp(masked)[0, i, alphabet.get_idx(mutant[i - 1])].item()
            out.append(total)
            continue
        score = 0.0
        for m in v.split(":"):  # label_row, summed over a multi-mutant's substitutions
            wt, idx, mt = m[0], int(m[1:-1]) - 1, m[-1]
            assert sequence[idx] == wt
            score += (token_probs[0, 1 + idx, alphabet.get_idx(mt)] - token_probs[0, 1 + idx,
                                                                                   alphabet.get_idx(wt)]).item()
        out.append(score)
    return np.array(out)


@pytest.fixture(scope="module")
def fair_esm(tmp_path_factory):
    return write_fair_esm(tmp_path_factory.mktemp("esm_score"), seed=3)


@pytest.mark.parametrize("strategy", ["wt-marginals", "masked-marginals", "pseudo-ll"])
def test_reproduces_esm1v_predict_py_on_fair_esm(fair_esm, strategy):
    import esm

    path, ref = fair_esm
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    want = predict_py_scores(ref, alphabet, WT, VARIANTS, strategy)
    got = score_variants(load_model(path), WT, VARIANTS, strategy=strategy)
    # pseudo-ll sums ~300 float32 log-probabilities (|score| ~ 700): equal to float32 rounding (seen: 1.7e-7 relative)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-6)
    assert np.ptp(got) > 0.05


# ---- the command --------------------------------------------------------------------------------
def _dms(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = [f"{WT[i]}{i + 24}{aa}" for i in range(len(WT)) for aa in "AW" if aa != WT[i]]
    df = pd.DataFrame({"": range(len(rows)), "mutant": rows, "fitness": rng.normal(size=len(rows)).round(4),
                       "note": ["x"] * len(rows)})
    df.loc[3, "fitness"] = np.nan  # a row without a measurement stays, unscored by rho
    path = tmp_path / "dms.csv"
    df.to_csv(path, index=False)
    return path


def test_pp_score_writes_every_row_and_rho(tmp_path, capsys):
    model = tiny_model()
    ckpt = save_checkpoint(model, tmp_path / "m.ckpt", "test")
    dms = _dms(tmp_path)
    fasta = tmp_path / "unigram.fasta"
    fasta.write_text(">a\nAAAAKKWW\n")
    out = tmp_path / "scored.csv"
    main([str(ckpt), str(dms), str(out), "--sequence", WT, "--offset-idx", "24", "--target-col", "fitness",
          "--unigram-fasta", str(fasta), "--device", "cpu"])
    src, got = pd.read_csv(dms, dtype=str, keep_default_na=False), pd.read_csv(out, dtype=str,
                                                                               keep_default_na=False)
    assert list(got.columns) == [*src.columns, "masked-marginals", "blosum62", "unigram"]
    assert out.read_text().startswith(",mutant,fitness,note,masked-marginals")
    pd.testing.assert_frame_equal(got[src.columns], src)
    want = score_variants(model, WT, list(src.mutant), offset_idx=24)
    np.testing.assert_allclose(got["masked-marginals"].astype(float), want, rtol=1e-5)
    rho = json.loads((tmp_path / "scored.csv.rho.json").read_text())
    assert rho["n_rows"] == len(src) and rho["n_with_target"] == len(src) - 1
    assert set(rho["spearman"]) == {"masked-marginals", "blosum62", "unigram"}
    assert rho["unigram"] == f"whole-file ({fasta}) frequencies of 25 residue letters"
    assert "Spearman rho masked-marginals vs fitness" in capsys.readouterr().out


def test_pp_score_errors_name_the_csv_line_and_skip_counts(tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.ckpt", "test")
    dms = _dms(tmp_path)
    text = dms.read_text().splitlines()
    text[5] = text[5].replace(",T26", ",Q26")  # data row 4, line 6
    dms.write_text("\n".join(text) + "\n")
    base = [str(ckpt), str(dms), str(tmp_path / "o.csv"), "--sequence", WT, "--offset-idx", "24", "--no-baselines"]
    with pytest.raises(SystemExit, match=r"^error: .*dms.csv:6: mutant 'Q26A': Q26A says wild type Q at "
                                         r"position 26, but the sequence has T there"):
        main(base)
    assert not (tmp_path / "o.csv").exists()
    main([*base, "--skip-mismatched"])
    assert "1 rows skipped: wild type does not match" in capsys.readouterr().out
    got = pd.read_csv(tmp_path / "o.csv", dtype=str, keep_default_na=False)
    assert len(got) == len(text) - 1 and got["masked-marginals"][4] == "" and got["masked-marginals"][3] != ""
    with pytest.raises(SystemExit, match=r"^error: .*dms.csv: no column 'mut'"):
        main([*base, "--mutation-col", "mut"])
    with pytest.raises(SystemExit, match=r"^error: .*dms.csv:2: mutant 'M24A': .* --offset-idx"):
        main([*base[:-3], "--offset-idx", "1", "--no-baselines"])
