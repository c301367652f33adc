"""ESM-2's contact prediction on a PerformerLM: logistic regression over the attention maps of every layer and head.

As fair-esm's ``ContactPredictionHead`` (Rao et al. 2021): the residue-by-residue attention maps of all
layers × heads (``<cls>``/``<eos>`` rows and columns removed) are symmetrised, APC-corrected, and a logistic
regression (``model.contact_head``, imported from ``<stem>-contact-regression.pt`` or Hugging Face's
``esm.contact_head.regression``) maps each residue pair's layers·heads features to a contact probability.
With FAVOR+ attention the maps are those of ``analysis.maps`` (the implicit FAVOR+ attention matrix).
"""

from __future__ import annotations

import torch

from proteinperformer.analysis.contacts import apc, symmetrize
from proteinperformer.analysis.maps import as_performer, attention_maps


@torch.no_grad()
def predict_contacts(model: torch.nn.Module, sequence: str) -> torch.Tensor:
    """Contact probabilities of one protein of L residues: float32 [L, L] (symmetric).

    Needs a model with a contact head (``model.config.contact_head``, i.e. one imported from ESM-2 with its
    contact regression weights); raises ValueError otherwise.
    """
    net = as_performer(model)
    if net.contact_head is None:
        raise ValueError("this model has no contact head: import an ESM-2 checkpoint with its "
                         "-contact-regression.pt file (or a Hugging Face ESM model) to predict contacts")
    maps = attention_maps(net, sequence)  # [layers, heads, L, L], residue rows/columns, raw
    features = apc(symmetrize(maps.flatten(0, 1)))  # [layers·heads, L, L]
    w = net.contact_head
    return torch.sigmoid(features.permute(1, 2, 0) @ w.weight[0].float() + w.bias.float())
