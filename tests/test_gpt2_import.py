"""GPT-2 import: a randomly initialised transformers ``GPT2LMHeadModel`` with a per-residue vocabulary (IgLM's
layout), saved with ``save_pretrained``, loads through ``load_model`` / ``pp-convert`` and reproduces the original
forward on a padded batch; causal FAVOR+ decoding equals its own full forward; unsupported models are refused
in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from proteinperformer.checkpoints import CheckpointError, load_model
from proteinperformer.cli import convert
from proteinperformer.inference.generate import init_states, sample, step_logits
from proteinperformer.model import convert_attention
from proteinperformer.tokenizer import Alphabet, TokenizationError

# IgLM's trained_models/vocab.txt layout: specials, the 20 residues, then conditioning tags
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"ACDEFGHIKLMNPQRSTVWY", "[CAMEL]", "[HUMAN]", "[MOUSE]",
         "[RABBIT]", "[RAT]", "[RHESUS]", "[HEAVY]", "[LIGHT]"]
SEQS = ["[HEAVY][HUMAN]EVQLVESGGGLVQPGGSLRLSCAAS", "[LIGHT][MOUSE]DIQMTQSPSSLSA", "[HEAVY][CAMEL]QVQLQESGG"]
LAYERS, DIM, HEADS, POSITIONS = 2, 64, 4, 64


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def write_gpt2(directory: Path, **overrides) -> torch.nn.Module:
    """A random GPT2LMHeadModel with the IgLM vocabulary saved as save_pretrained does, plus vocab.txt."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    settings = dict(vocab_size=len(VOCAB), n_positions=POSITIONS, n_embd=DIM, n_layer=LAYERS, n_head=HEADS,
                    activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**{**settings, **overrides})).eval()
    _perturb(model, 0)
    model.tie_weights()
    model.save_pretrained(directory)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gpt2") / "tiny_iglm"
    return path, write_gpt2(path)


def _batch(alphabet: Alphabet) -> torch.Tensor:
    """IgLM framing, right-padded: [chain] [species] residues [SEP] [PAD]..."""
    rows = [alphabet.encode(s).tolist() + [alphabet.eos_idx] for s in SEQS]
    tokens = torch.full((len(rows), max(map(len, rows))), alphabet.padding_idx)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return tokens


def test_tags_encode_inside_sequences():
    alphabet = Alphabet(VOCAB)
    assert (alphabet.padding_idx, alphabet.cls_idx, alphabet.eos_idx, alphabet.mask_idx) == (0, 2, 3, 4)
    assert alphabet.encode("[HEAVY][HUMAN]ACy").tolist() == [31, 26, 5, 6, 24]
    assert alphabet.decode(alphabet.encode("[HEAVY]EVQ")) == "EVQ"
    assert alphabet.decode(alphabet.encode("[HEAVY]EVQ"), keep_special=True) == "[HEAVY]EVQ"
    with pytest.raises(TokenizationError, match=r"'s1'.*unknown tag '\[DOG\]' at position 8"):
        alphabet.encode("[HEAVY][DOG]EV", "s1")
    with pytest.raises(TokenizationError, match=r"'s2'.*invalid character 'X' at position 10.*\[HEAVY\]"):
        alphabet.encode("[HEAVY]EVX", "s2")  # IgLM's vocabulary has no X
    with pytest.raises(TokenizationError, match="invalid character '<'"):
        Alphabet().encode("<mask>MK")  # named alphabets take no tags: unchanged behaviour
    with pytest.raises(ValueError, match="lacks the special tokens mask"):
        Alphabet(VOCAB[:4] + VOCAB[5:])


def test_exact_import_reproduces_gpt2_lm_head_model(gpt2_dir):
    path, ref = gpt2_dir
    model = load_model(path)
    cfg = model.config
    assert (cfg.causal, cfg.positions, cfg.activation, cfg.max_positions) == (True, "learned", "gelu_new", POSITIONS)
    assert model.alphabet.all_toks == VOCAB
    tokens = _batch(model.alphabet)
    real = tokens != 0
    assert not real.all()  # a padded batch
    with torch.no_grad():
        want = ref(input_ids=tokens, attention_mask=real.long()).logits
        got = model(tokens)["logits"]
    assert (got[real] - want[real]).abs().max() <= 1e-4


def test_pytorch_model_bin_with_old_mask_buffers(gpt2_dir, tmp_path):
    """pytorch_model.bin as older transformers wrote it (IgLM's): with attn.bias / attn.masked_bias buffers."""
    path, ref = gpt2_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    (tmp_path.parent / "vocab.txt").write_text("\n".join(VOCAB))  # one folder up, as IgLM's trained_models/
    state = dict(ref.state_dict())
    for i in range(LAYERS):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(POSITIONS, POSITIONS)).view(1, 1, POSITIONS,
                                                                                                  POSITIONS)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_model(tmp_path)
    tokens = _batch(model.alphabet)
    with torch.no_grad():
        want = ref(input_ids=tokens, attention_mask=(tokens != 0).long()).logits
        assert (model(tokens)["logits"] - want)[tokens != 0].abs().max() <= 1e-4
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, POSITIONS, POSITIONS)  # not causal: refused
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="h.0.attn.bias is not the lower-triangular causal mask"):
        load_model(tmp_path)


def test_favor_decoding_steps_equal_the_full_causal_forward(gpt2_dir):
    path, _ = gpt2_dir
    model = load_model(path, attention="favor", num_features=32)
    assert model.config.kernel == "softmax" and model.config.causal
    tokens = _batch(model.alphabet)[:1]  # one unpadded row
    with torch.no_grad():
        full = model(tokens)["logits"][0]
    states = init_states(model, 1)
    for t in range(tokens.shape[1]):
        logits, states = step_logits(model, tokens[:, t], t, states)
        assert (logits[0] - full[t]).abs().max() <= 1e-4
    # a conditioning prompt: every sample starts with the prompt, holds only residues, and is reproducible
    out = sample(model, model.alphabet, num_samples=3, max_length=20, prompt="[HEAVY][HUMAN]EVQ", seed=1,
                 start_with_cls=False)
    assert all(s.startswith("EVQ") and set(s) <= set("ACDEFGHIKLMNPQRSTVWY") for s in out)
    assert out == sample(model, model.alphabet, num_samples=3, max_length=20, prompt="[HEAVY][HUMAN]EVQ", seed=1,
                         start_with_cls=False)


def test_pp_convert_writes_a_favor_checkpoint_with_the_vocabulary(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    out = tmp_path / "iglm_favor.ckpt"
    convert.main([str(path), str(out), "--attention", "favor", "--num-features", "32", "--seed", "2"])
    model = load_model(out)
    assert model.alphabet.all_toks == VOCAB and model.config.attention == "favor" and model.config.causal
    want = convert_attention(load_model(path), "favor", 32, "softmax", seed=2)
    tokens = _batch(model.alphabet)
    with torch.no_grad():
        assert torch.equal(model(tokens)["logits"], want(tokens)["logits"])


@pytest.mark.parametrize("override,message", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"add_cross_attention": True}, "cross-attention"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_configs_are_refused_in_one_line(gpt2_dir, tmp_path, override, message):
    path, _ = gpt2_dir
    for f in ("model.safetensors", "vocab.txt"):
        shutil.copy(path / f, tmp_path / f)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **override}))
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(tmp_path), str(tmp_path / "out.ckpt")])
    err = str(exit_.value.code)  # run_command exits with the one-line message (printed to stderr, status 1)
    assert err.startswith(f"error: {tmp_path / 'config.json'}: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out.ckpt").exists()


def test_bpe_vocabulary_and_mismatched_weights_are_refused(gpt2_dir, tmp_path):
    path, ref = gpt2_dir
    bpe = tmp_path / "protgpt2"
    bpe.mkdir()
    shutil.copy(path / "config.json", bpe / "config.json")
    (bpe / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "MK": 1}))
    (bpe / "merges.txt").write_text("#version: 0.2\nM K\n")
    with pytest.raises(CheckpointError, match="BPE vocabulary.*not supported"):
        load_model(bpe)
    wordpiece = tmp_path / "wordpiece"
    shutil.copytree(path, wordpiece)
    (wordpiece / "vocab.txt").write_text("\n".join(VOCAB + ["MKV"]))
    with pytest.raises(CheckpointError, match=r"multi-letter tokens \['MKV'\]"):
        load_model(wordpiece)
    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    state["transformer.extra.weight"] = torch.zeros(3)
    (extra / "model.safetensors").unlink()
    torch.save(state, extra / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"c_attn.weight has shape \(192, 64\), the config wants \(64, 192\)"
                                              r".*unused tensors \['extra.weight'\]"):
        load_model(extra)


def test_report_scores_next_residues_for_a_causal_model(gpt2_dir, tmp_path):
    from proteinperformer.evaluation.conversion import report

    path, _ = gpt2_dir
    fasta = tmp_path / "abs.fasta"
    fasta.write_text(">a\nEVQLVESGGGLVQPGGSLRLSCAAS\n>b\nDIQMTQSPSSLSA\n")
    r = report(path, fasta, num_features=16, draws=2)
    assert r["objective"] == "next-residue" and r["masked_residues"] == 25 + 13  # every residue, the first from [CLS]
    assert 0 <= r["favor_acc"] <= 1 and r["exact_ppl"] > 1 and len(r["layer_rel_error_mean"]) == LAYERS
    assert all(0 < e < 1 for e in r["layer_rel_error_mean"])
