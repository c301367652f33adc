"""pp-embed --include contacts: the head pp-contacts saves, or the model's own contact regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from proteinperformer.analysis import ContactHead, contact_features, load_structures, predict_contact_map
from proteinperformer.analysis.contacts import fit_contact_regression, predict_contacts
from proteinperformer.checkpoints import load_model
from proteinperformer.cli import contacts as contacts_cli
from proteinperformer.cli.embed import main
from proteinperformer.inference.embed import embed
from proteinperformer.inference.embed_files import read_embeddings

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / "data/structures/pdb_chains_subset60.npz"


def test_contact_head_equals_the_fitted_pipeline_and_round_trips(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint)
    chains = load_structures(STRUCTURES)[:3]
    feats = [contact_features(model, c.sequence) for c in chains]
    from proteinperformer.analysis import contact_map

    reg = fit_contact_regression(feats[:2], [contact_map(c.cb) for c in chains[:2]])
    head = ContactHead.from_pipeline(reg, model.config.depth, model.config.heads)
    np.testing.assert_allclose(head.predict(feats[2]), predict_contacts(reg, feats[2]), atol=1e-6)
    again = ContactHead.load(head.save(tmp_path / "head.json"))
    assert again == head
    (tmp_path / "bad.json").write_text('{"layers": 2}')
    with pytest.raises(ValueError, match="bad.json: not a contact head"):
        ContactHead.load(tmp_path / "bad.json")


def test_pp_embed_include_contacts_uses_the_pp_contacts_head(tiny_checkpoint, tmp_path):
    contacts_cli.main([str(tiny_checkpoint), "--structures", str(STRUCTURES), "--train-chains", "3", "--n-chains",
                       "4", "--out", str(tmp_path / "contacts")])
    head_path = tmp_path / "contacts" / "contact_head.json"
    head = ContactHead.load(head_path)
    chain = load_structures(STRUCTURES)[5]
    fasta = tmp_path / "x.fasta"
    fasta.write_text(f">{chain.id}\n{chain.sequence}\n>short\nMKTAYIAKQRQISFVKSHFSRQ\n")
    model = load_model(tiny_checkpoint)
    for fmt in ("pt", "npz", "h5"):
        out = tmp_path / fmt
        main([str(tiny_checkpoint), str(fasta), str(out), "--include", "mean", "contacts", "--contact-head",
              str(head_path), "--format", fmt])
        got = read_embeddings(out, fmt)[chain.id]
        L = len(chain.sequence)
        assert got["contacts"].shape == (L, L) and torch.equal(got["contacts"], got["contacts"].T)
        assert 0 <= got["contacts"].min() and got["contacts"].max() <= 1
        np.testing.assert_allclose(got["contacts"].numpy(), predict_contact_map(model, chain.sequence, head),
                                   atol=1e-6)
        assert got["mean_representations"][2].shape == (32,)
    with pytest.raises(ValueError, match="needs a contact head"):
        embed(model, {"a": "MKV"}, include=("contacts",))


def test_contacts_from_the_models_own_regression(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    torch.manual_seed(0)
    model.contact_head = torch.nn.Linear(model.config.depth * model.config.heads, 1)  # as an ESM-2 import has
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    got = embed(model, {"p": seq}, include=("contacts",))["p"]["contacts"]
    feats = torch.from_numpy(contact_features(model, seq))  # [F, L, L]
    expected = torch.sigmoid(feats.permute(1, 2, 0) @ model.contact_head.weight[0] + model.contact_head.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
