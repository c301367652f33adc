"""Attention transfer (pp-convert --transfer): only the feature parameters are trained, the attention error on held-out
sequences falls, the checkpoint loads in every tool and decodes as it runs, a stopped run resumes; bad input gives
one line."""

import json
from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import load_model, read_torch, save_checkpoint
from proteinperformer.cli import convert
from proteinperformer.evaluation.conversion import attention_errors
from proteinperformer.model import ModelConfig, PerformerLM, convert_attention, is_feature_key
from proteinperformer.model.transfer import (
    calibration_batches,
    default_steps,
    distill_features,
    mutated_copies,
    transfer_attention,
    transfer_model,
)
from tests.test_esm_import import hf_dir, write_fair_esm  # noqa: F401 (hf_dir: a fixture)
from tests.test_gpt2_import import DIM, LAYERS, write_gpt2

CALIBRATION = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRKRRHERHLFPELHADFPWARGQAYLASMGGGADAKPLAEREQLWNEAVRQGRPRMEGTVLASLKSDSHRDGAGSA"[i:i + 60] for i in range(0, 300, 50)]  # noqa: E501
HELD_OUT = ["MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHV",
            "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKQ"]


def write_fasta(path: Path, seqs: list[str], prefix: str = "") -> Path:
    path.write_text("".join(f">s{i}\n{prefix}{s}\n" for i, s in enumerate(seqs)))
    return path


@pytest.fixture(scope="module")
def esm_file(tmp_path_factory) -> Path:
    # large weights: trained-like sharp attention, where FAVOR+ with few features is far off
    return write_fair_esm(tmp_path_factory.mktemp("esm"), layers=2, dim=32, heads=4, scale=0.3)[0]


@pytest.fixture(scope="module")
def transferred(esm_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("transfer")
    out = tmp / "fit.ckpt"
    convert.main([str(esm_file), str(out), "--transfer", str(write_fasta(tmp / "calib.fasta", CALIBRATION)),
                  "--transfer-steps", "60", "--num-features", "16", "--seed", "1"])
    return out


def test_transfer_trains_only_the_features_and_lowers_the_held_out_error(esm_file, transferred):
    exact, model = load_model(esm_file), load_model(transferred)
    assert model.config.transferred and model.config.attention == "favor" and model.config.num_features == 16
    ours, theirs = model.state_dict(), exact.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items() if not is_feature_key(k))  # bit-identical
    trained = {k for k in ours if is_feature_key(k) and not k.endswith("projection")}
    assert trained == {f"layers.{i}.attn.{n}" for i in range(2) for n in ("feature_scale", "feature_weight")}
    untrained = convert_attention(exact, "favor", 16, "softmax", seed=1)  # the same draw, no transfer
    assert all(torch.equal(ours[k], untrained.state_dict()[k]) for k in ours if k.endswith("attn.projection"))
    tokens = exact.alphabet.get_batch_converter()([(f"h{i}", s) for i, s in enumerate(HELD_OUT)])[2]
    before = [e / n for e, n in attention_errors(exact, untrained, tokens)]
    after = [e / n for e, n in attention_errors(exact, model, tokens)]
    assert all(a < 0.7 * b for a, b in zip(after, before, strict=True)), (before, after)
    info = read_torch(transferred)["transfer"]
    assert len(info["layers"]) == 2 and all(r["error_after"] < r["error_before"] for r in info["layers"])
    assert not transferred.with_name(f".{transferred.name}.transfer").exists()  # the resume folder is cleaned up


def test_the_transferred_checkpoint_loads_in_every_tool(esm_file, transferred, tmp_path):
    from proteinperformer.cli.embed import main as pp_embed
    from proteinperformer.cli.evaluate import main as pp_evaluate
    from proteinperformer.cli.score import main as pp_score
    from proteinperformer.inference.embed_files import read_embeddings

    model = load_model(transferred, attention="favor")  # the same attention asked for: the trained features stay
    assert model.config.transferred
    assert torch.equal(model.layers[0].attn.feature_weight, load_model(transferred).layers[0].attn.feature_weight)
    model.redraw_features()  # a trained map is never redrawn
    assert torch.equal(model.layers[0].attn.projection, load_model(transferred).layers[0].attn.projection)
    assert not load_model(transferred, num_features=32).config.transferred  # another map: features dropped
    pp_embed([str(transferred), str(write_fasta(tmp_path / "x.fasta", HELD_OUT)), str(tmp_path / "emb"),
              "--include", "mean"])
    assert read_embeddings(tmp_path / "emb")["s0"]["mean_representations"][2].shape == (32,)
    csv = tmp_path / "dms.csv"
    csv.write_text("mutant,score\nM1A,0.1\nV2L,0.3\nL3K,-0.2\n")
    pp_score([str(transferred), str(csv), str(tmp_path / "out.csv"), "--sequence", HELD_OUT[0], "--no-baselines"])
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 4
    blosum = write_fasta(tmp_path / "b.fasta", CALIBRATION[:3])  # pp-evaluate's attention maps use the trained map
    pp_evaluate([str(transferred), "--out", str(tmp_path / "card"), "--skip", "mlm", "ss3", "location", "go_mf",
                 "fold_class", "contacts", "dms", "--blosum-fasta", str(blosum), "--blosum-n-seqs", "3"])
    assert "blosum" in json.loads((tmp_path / "card" / "card.json").read_text())["sections"]


def test_gpt2_transfer_decodes_as_it_runs_and_hedgehog_trains_its_projection(tmp_path):
    from proteinperformer.cli.generate import main as pp_generate
    from proteinperformer.inference.generate import init_states, step_logits

    src = tmp_path / "tiny_iglm"
    write_gpt2(src)
    calib = write_fasta(tmp_path / "c.fasta", [s[:40] for s in CALIBRATION], prefix="[HEAVY][HUMAN]")
    for kernel in ("softmax", "hedgehog"):
        out = tmp_path / f"{kernel}.ckpt"
        convert.main([str(src), str(out), "--transfer", str(calib), "--transfer-steps", "20", "--num-features", "16",
                      "--kernel", kernel, "--no-cls"])
        model, exact = load_model(out), load_model(src)
        changed = {k for k, v in model.state_dict().items() if k not in exact.state_dict()
                   or not torch.equal(v, exact.state_dict()[k])}
        assert changed and all(is_feature_key(k) for k in changed)
        tokens = model.alphabet.encode("[HEAVY][HUMAN]EVQLVESGGGLVQ")[None]
        with torch.no_grad():
            full = model(tokens)["logits"][0]
        states = init_states(model, 1)
        for t in range(tokens.shape[1]):  # the decoding state uses the trained features too
            logits, states = step_logits(model, tokens[:, t], t, states)
            assert (logits[0] - full[t]).abs().max() <= 1e-4
    assert model.layers[0].attn.projection.shape == (4, 8, 16)  # hedgehog: one W per head, m/2 rows
    pp_generate([str(out), str(tmp_path / "gen.fasta"), "--num-samples", "2", "--max-length", "12",
                 "--prompt", "[HEAVY][HUMAN]EVQ", "--no-cls", "--seed", "0"])
    assert (tmp_path / "gen.fasta").read_text().count(">") == 2


def test_default_steps_spend_the_same_budget_of_work_on_every_model():
    assert default_steps(3, 192, 256) == 500  # IgLM-S: the measured default
    assert default_steps(4, 512, 256) == 140  # the 13M IgLM: the same ~1.5 CPU-minutes
    assert default_steps(3, 192, 64) == 1000  # fewer features, cheaper steps
    for depth, width, m in [(3, 192, 512), (4, 512, 64), (6, 320, 256), (2, 256, 128)]:
        work = depth * width * (m + 128) * default_steps(depth, width, m)
        assert work == pytest.approx(3 * 192 * 384 * 500, rel=0.05), (depth, width, m)
    assert default_steps(33, 1280, 256) == 50 and default_steps(1, 8, 16) == 2000  # kept in range


def test_pp_convert_transfers_with_the_default_steps_of_the_model(tmp_path, monkeypatch, capsys):
    import proteinperformer.model.transfer as transfer

    monkeypatch.setattr(transfer, "TRANSFER_BUDGET", LAYERS * DIM * (16 + 128) * 60)  # 60 steps here: quick
    src = tmp_path / "tiny_iglm"
    write_gpt2(src)
    calib = write_fasta(tmp_path / "c.fasta", [s[:40] for s in CALIBRATION[:2]], prefix="[HEAVY][HUMAN]")
    out = tmp_path / "m.ckpt"
    convert.main([str(src), str(out), "--transfer", str(calib), "--num-features", "16", "--no-cls"])
    info = read_torch(out)["transfer"]
    assert info["steps"] == 60 and info["distill_steps"] == 0 and "60 steps each (" in capsys.readouterr().out
    assert load_model(out).config.attention_window == transfer.DEFAULT_WINDOW == 16  # causal softmax: the window
    convert.main([str(src), str(out), "--transfer", str(calib), "--num-features", "16", "--no-cls",
                  "--distill-steps", "12", "--window", "0"])
    info = read_torch(out)["transfer"]
    assert info["distill_steps"] == 12 and "60 steps each, then 12 steps on all layers" in capsys.readouterr().out
    assert load_model(out).config.attention_window == 0  # --window 0: plain FAVOR
    assert info["distill_kl_after"] < info["distill_kl_before"]


def test_distillation_lowers_the_next_token_kl_on_held_out_sequences_and_touches_only_the_features():
    torch.manual_seed(0)
    exact = PerformerLM(ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, attention="exact", kernel="softmax",
                                    causal=True)).eval()
    with torch.no_grad():
        for block in exact.layers:
            block.attn.qkv.weight.mul_(6)  # sharp attention, as in trained models
    batches = calibration_batches(exact.alphabet, [(f"c{i}", s) for i, s in enumerate(CALIBRATION)])
    held_out = calibration_batches(exact.alphabet, [(f"h{i}", s) for i, s in enumerate(HELD_OUT)])
    model = transfer_model(exact, 16)
    transfer_attention(exact, model, batches, steps=30, log=None)
    layerwise = {k: v.clone() for k, v in model.state_dict().items()}

    def held_out_kl() -> float:
        with torch.no_grad():
            (tokens, padding), = held_out
            le = torch.log_softmax(exact(tokens, padding)["logits"], -1)
            lm = torch.log_softmax(model(tokens, padding)["logits"], -1)
            return float(((le.exp() * (le - lm)).sum(-1) * ~padding).sum() / (~padding).sum())

    before = held_out_kl()
    kl_before, kl_after, _ = distill_features(exact, model, batches, steps=60, log=None)
    assert kl_after < 0.8 * kl_before and held_out_kl() < 0.9 * before, (kl_before, kl_after, before, held_out_kl())
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, layerwise[k])}
    assert changed and all(is_feature_key(k) and not k.endswith("projection") for k in changed)
    assert all(p.requires_grad for p in model.parameters())  # as they were before


def test_a_stopped_transfer_resumes_from_its_finished_layers(tmp_path):
    torch.manual_seed(0)
    exact = PerformerLM(ModelConfig(dim=32, depth=2, heads=2, ff_dim=64, attention="exact", kernel="softmax")).eval()
    batches = calibration_batches(exact.alphabet, [("a", CALIBRATION[0]), ("b", CALIBRATION[1][:30])])
    first = transfer_model(exact, 16)
    full = transfer_attention(exact, first, batches, steps=10, resume_dir=tmp_path / "r", log=None)
    (tmp_path / "r" / "layer1.pt").unlink()  # stopped after layer 0
    again = transfer_model(exact, 16)
    resumed = transfer_attention(exact, again, batches, steps=10, resume_dir=tmp_path / "r", log=None)
    assert [r.resumed for r in resumed] == [True, False]
    assert [r.error_after for r in resumed] == pytest.approx([r.error_after for r in full], rel=1e-5)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    other = transfer_attention(exact, transfer_model(exact, 16), batches, steps=11, resume_dir=tmp_path / "r", log=None)
    assert not any(r.resumed for r in other)  # other settings: the folder's layers are not reused


def test_bad_transfer_input_is_one_line(esm_file, transferred, tmp_path, capsys):
    calib = write_fasta(tmp_path / "c.fasta", CALIBRATION[:2])
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    bad = write_fasta(tmp_path / "bad.fasta", ["MKT", "MK1J"])
    no_layers = tmp_path / "nolayers.ckpt"
    save_checkpoint(PerformerLM(ModelConfig(dim=16, depth=0, heads=2, ff_dim=32, attention="exact")), no_layers, "x")
    cases = [([str(transferred), "--transfer", str(calib)], "already transferred"),
             ([str(esm_file), "--transfer", str(empty)], "empty.fasta"),
             ([str(esm_file), "--transfer", str(bad)], "bad.fasta:3"),
             ([str(no_layers), "--transfer", str(calib)], "no attention layers"),
             ([str(esm_file), "--transfer", str(calib), "--attention", "exact"], "FAVOR")]
    for args, message in cases:
        out = tmp_path / "out.ckpt"
        with pytest.raises(SystemExit) as err:
            convert.main([args[0], str(out), *args[1:]])
        text = str(err.value)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
        assert not out.exists()


def test_transfer_from_favor_plus_plus_calibrates_first_and_keeps_the_calibration(tmp_path):
    from proteinperformer.model import is_calibrated

    torch.manual_seed(0)
    exact = PerformerLM(ModelConfig(dim=32, depth=1, heads=2, ff_dim=64, attention="exact", kernel="softmax",
                                    causal=True)).eval()
    with torch.no_grad():
        exact.layers[0].attn.qkv.weight.mul_(30)  # sharp attention
    batches = calibration_batches(exact.alphabet, [("a", CALIBRATION[0]), ("b", CALIBRATION[1])])
    model = transfer_model(exact, 16, features="oprf-rescaled")
    [result] = transfer_attention(exact, model, batches, steps=40, log=None)
    assert is_calibrated(model) and result.error_after < 0.8 * result.error_before
    path = save_checkpoint(model, tmp_path / "m.ckpt", "x")
    again = load_model(path)
    assert again.config.features == "oprf-rescaled" and again.config.transferred
    tokens = batches[0][0]
    with torch.no_grad():
        assert torch.equal(again(tokens)["logits"], model(tokens)["logits"])


def test_hedgehog_map_paths_equal_its_definition():
    """Hedgehog's map with one projection per head: noncausal, causal and decoding paths equal the plain quadratic
    definition (float64), and each half of φ is a softmax over its m/2 features."""
    from proteinperformer.attention import favor_attention, favor_step
    from proteinperformer.attention.features import feature_map
    from proteinperformer.attention.reference import favor_reference

    g = torch.Generator().manual_seed(0)
    B, H, L, d, m = 2, 3, 7, 8, 10
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    P = feature_map("hedgehog").init_projection(m, d, H, generator=g).double()
    assert P.shape == (H, m // 2, d)
    phi = feature_map("hedgehog").features(q, P) - feature_map("hedgehog").eps
    torch.testing.assert_close(phi[..., : m // 2].sum(-1), torch.ones(B, H, L, dtype=torch.float64))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 5:] = True
    for causal in (False, True):
        want = favor_reference(q, k, v, P, "hedgehog", causal=causal, key_padding_mask=mask)
        got = favor_attention(q, k, v, P, "hedgehog", causal=causal, key_padding_mask=mask)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1, :, :5], want[1, :, :5])
    state, rows = None, []
    for t in range(L):
        y, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, "hedgehog")
        rows.append(y)
    torch.testing.assert_close(torch.cat(rows, 2), favor_reference(q, k, v, P, "hedgehog", causal=True))


def test_hugging_face_esm_goes_through_the_same_route(hf_dir, tmp_path):  # noqa: F811 (the fixture)
    path, _ = hf_dir
    out = tmp_path / "hf_fit.ckpt"
    convert.main([str(path), str(out), "--transfer", str(write_fasta(tmp_path / "c.fasta", CALIBRATION[:3])),
                  "--transfer-steps", "5", "--num-features", "16"])
    model, exact = load_model(out), load_model(path)
    assert model.config.transferred and model.config.alphabet == "esm"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exact.state_dict().items() if not is_feature_key(k))


def test_mutated_copies_replace_only_residues_at_the_rate_asked_and_keep_the_tags():
    records = [(f"s{i}", "[HEAVY][HUMAN]" + seq) for i, seq in enumerate(CALIBRATION)]
    out = mutated_copies(records, 3, rate=0.2, seed=1)
    assert out[: len(records)] == records and len(out) == 4 * len(records)
    assert mutated_copies(records, 3, rate=0.2, seed=1) == out and mutated_copies(records, 0) == records
    changed = total = 0
    for (rid, seq), (cid, copy) in zip(records * 3, out[len(records):], strict=True):
        assert cid.startswith(rid + "/mutated") and copy.startswith("[HEAVY][HUMAN]") and len(copy) == len(seq)
        changed += sum(a != b for a, b in zip(seq, copy, strict=True))
        total += len(seq) - len("[HEAVY][HUMAN]")
    # a replacement draws the same letter 1 time in 20: 19/20 of the rate, ± 4 binomial sd (3 × 360 residues)
    expected = 0.2 * 19 / 20
    assert abs(changed / total - expected) < 4 * (expected * (1 - expected) / total) ** 0.5
