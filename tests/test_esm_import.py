"""ESM-2 import: randomly initialised fair-esm ``ESM2`` and transformers ``EsmForMaskedLM`` models, saved in their
real formats, load through ``load_model`` and reproduce the original forward (representations and logits,
X/B/Z/U letters, <mask> tokens with token dropout, a padded batch); bad files give clear errors."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import CheckpointError, load_model, read_torch
from proteinperformer.inference.embed import embed
from proteinperformer.model import convert_attention

SEQS = [("a", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"), ("b", "MXBZUKLVAAGG"), ("c", "MKVLAAGIUXZBWCDEFHN")]
LAYERS, DIM, HEADS = 2, 64, 4


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Random values in every parameter (LayerNorm gains and biases included), so nothing is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def write_fair_esm(directory: Path, layers: int = LAYERS, dim: int = DIM, heads: int = HEADS, seed: int = 0,
                   scale: float = 0.1) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised fair-esm ESM2 saved as fair-esm does (prefixed keys, Namespace cfg, regression file)."""
    import esm

    torch.manual_seed(seed)
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    model = esm.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet,
                     token_dropout=True).eval()
    _perturb(model, seed, scale)
    state = model.state_dict()
    prefixed = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
                for k, v in state.items() if not k.startswith("contact_head")}
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads,
                             token_dropout=True, encoder_ffn_embed_dim=4 * dim)
    path = directory / f"esm2_t{layers}_tiny_UR50D.pt"
    torch.save({"model": prefixed, "cfg": {"model": cfg}}, path)
    regression = {k: v for k, v in state.items() if k.startswith("contact_head")}
    torch.save({"model": regression}, path.with_name(f"esm2_t{layers}_tiny_UR50D-contact-regression.pt"))
    return path, model


@pytest.fixture(scope="module")
def fair_esm_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    return write_fair_esm(tmp_path_factory.mktemp("fair"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import EsmConfig, EsmForMaskedLM

    torch.manual_seed(1)
    config = EsmConfig(vocab_size=33, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=4 * DIM, position_embedding_type="rotary", token_dropout=True,
                       mask_token_id=32, pad_token_id=1, max_position_embeddings=1026, emb_layer_norm_before=False,
                       layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = EsmForMaskedLM(config).eval()
    _perturb(model, 1)
    model.tie_weights()
    path = tmp_path_factory.mktemp("hf") / "esm2_tiny"
    model.save_pretrained(path)
    return path, model


def _tokens(alphabet_converter, with_mask: bool = True) -> torch.Tensor:
    _, _, tokens = alphabet_converter(SEQS)
    if with_mask:
        tokens[0, 3] = tokens[0, 7] = tokens[2, 5] = 32  # <mask>: exercises token dropout
    return tokens


def test_fair_esm_exact_import_reproduces_esm2(fair_esm_file):
    path, ref = fair_esm_file
    model = load_model(path, attention="exact")
    assert model.config.alphabet == "esm" and model.config.contact_head and model.config.positions == "rotary"
    tokens = _tokens(ref.alphabet.get_batch_converter())  # fair-esm's own batch converter
    assert (tokens == 1).any()  # a padded batch
    with torch.no_grad():
        want = ref(tokens, repr_layers=[LAYERS])
        got = model(tokens, repr_layers=[LAYERS])
    real = tokens != 1
    assert torch.allclose(got["representations"][LAYERS][real], want["representations"][LAYERS][real], atol=1e-4)
    assert torch.allclose(got["logits"][real], want["logits"][real], atol=1e-4)
    # embed(): per_tok rows are the residues only, each sequence as in ESM's own forward
    reps = embed(model, SEQS, layers=[-1], include=("per_tok", "bos"))
    import esm

    converter = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    for label, seq in SEQS:
        with torch.no_grad():
            alone = ref(converter([(label, seq)])[2], repr_layers=[LAYERS])["representations"][LAYERS][0]
        assert reps[label]["per_tok"][-1].shape == (len(seq), DIM)
        assert torch.allclose(reps[label]["per_tok"][-1], alone[1 : len(seq) + 1], atol=1e-4)
        assert torch.allclose(reps[label]["bos"][-1], alone[0], atol=1e-4)


def test_fair_esm_contacts_match(fair_esm_file):
    from proteinperformer.analysis import predict_contact_map

    path, ref = fair_esm_file
    model = load_model(path)
    import esm

    tokens = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()([SEQS[2]])[2]
    with torch.no_grad():
        want = ref(tokens, return_contacts=True)["contacts"][0]
    got = torch.as_tensor(predict_contact_map(model, SEQS[2][1]))
    assert got.shape == (len(SEQS[2][1]),) * 2
    assert torch.allclose(got, want, atol=1e-4)


def test_hf_exact_import_reproduces_esm_for_masked_lm(hf_dir):
    path, ref = hf_dir
    model = load_model(path, attention="exact")
    tokens = _tokens(model.alphabet.get_batch_converter())
    attention_mask = (tokens != 1).long()
    with torch.no_grad():
        want = ref(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=True)
        final = ref.esm(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
        got = model(tokens, repr_layers=[LAYERS])
    real = tokens != 1
    assert torch.allclose(got["representations"][LAYERS][real], final[real], atol=1e-4)
    assert torch.allclose(got["logits"][real], want.logits[real], atol=1e-4)
    # pytorch_model.bin instead of safetensors
    bin_dir = path.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(ref.state_dict(), bin_dir / "pytorch_model.bin")
    again = load_model(bin_dir)
    with torch.no_grad():
        assert torch.allclose(again(tokens)["logits"][real], want.logits[real], atol=1e-4)
    sharded = path.parent / "sharded"  # model.safetensors.index.json + shards, as the large ESM-2 repos
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert torch.allclose(load_model(sharded)(tokens)["logits"][real], want.logits[real], atol=1e-4)


def test_favor_import_approximates_and_converts_back(fair_esm_file):
    path, ref = fair_esm_file
    exact = load_model(path)
    favor = load_model(path, attention="favor", num_features=256)
    assert favor.config.attention == "favor" and favor.config.kernel == "softmax"
    tokens = _tokens(exact.alphabet.get_batch_converter(), with_mask=False)
    with torch.no_grad():
        e, f = exact(tokens)["logits"], favor(tokens)["logits"]
        back = convert_attention(favor, "exact")(tokens)["logits"]
    real = tokens != 1
    assert torch.equal(back[real], e[real])  # the weights are untouched
    assert not torch.allclose(f[real], e[real], atol=1e-4)
    errors = []
    for m in (32, 2048):  # FAVOR+ estimates the imported softmax attention: more features, smaller error
        with torch.no_grad():
            out = load_model(path, attention="favor", num_features=m)(tokens)["logits"]
        errors.append(((out - e)[real].norm() / e[real].norm()).item())
    assert errors[1] < 0.8 * errors[0], errors  # (sharp random attention: the error falls slowly)


def _write(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_bad_inputs_give_clear_errors(tmp_path, fair_esm_file, hf_dir):
    src, _ = fair_esm_file
    data = read_torch(src)
    with pytest.raises(CheckpointError, match=r"not a proteinperformer checkpoint.*fair-esm ESM-2"):
        load_model(_write(tmp_path / "x.pt", {"foo": torch.zeros(1)}))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text.pt: not a readable torch checkpoint"):
        load_model(tmp_path / "text.pt")
    for arch, name in (("roberta_large", "ESM-1b"), ("protein_bert_base", "ESM-1"), ("msa_transformer", "MSA")):
        bad = _write(tmp_path / f"{arch}.pt", {"args": argparse.Namespace(arch=arch), "model": {}})
        with pytest.raises(CheckpointError, match=rf"{arch}.pt: a {name}.*not supported; supported: ESM-2"):
            load_model(bad)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"trunc.pt: not a readable torch checkpoint; truncated"):
        load_model(truncated)
    empty_hf = tmp_path / "hf_empty"
    empty_hf.mkdir()
    with pytest.raises(CheckpointError, match=r"hf_empty: a directory without config.json"):
        load_model(empty_hf)
    (empty_hf / "config.json").write_text((hf_dir[0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"hf_empty: config.json but no weights"):
        load_model(empty_hf)
    cfg = json.loads((hf_dir[0] / "config.json").read_text())
    (empty_hf / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "absolute"}))
    with pytest.raises(CheckpointError, match=r"ESM-1b-style model, not supported"):
        load_model(empty_hf)
    wide = {**data, "cfg": {"model": argparse.Namespace(**{**vars(data["cfg"]["model"]), "encoder_embed_dim": 32})}}
    with pytest.raises(CheckpointError, match=r"shape \(64, 64\), the config wants \(32, 32\)"):
        load_model(_write(tmp_path / "wide.pt", wide))
    extra = {**data, "model": {**data["model"], "encoder.sentence_encoder.extra.weight": torch.zeros(2)}}
    with pytest.raises(CheckpointError, match=r"extra.pt.*unused tensors \['extra.weight'\]"):
        load_model(_write(tmp_path / "extra.pt", extra))
    missing = {**data, "model": {k: v for k, v in data["model"].items() if "layers.1.fc2.bias" not in k}}
    with pytest.raises(CheckpointError, match=r"missing layers.1.fc2.bias"):
        load_model(_write(tmp_path / "missing.pt", missing))
    code = {**data, "cfg": {"model": Path("/tmp")}}  # a pickled class outside the allow-list
    with pytest.raises(CheckpointError, match=r"code.pt: holds pickled objects outside the allow-list"):
        load_model(_write(tmp_path / "code.pt", code))
