"""Checkpoints: the one loader (:func:`load_model`), safe file reading and writing, the ESM-2 importer and the
exact → FAVOR+ conversion (``pp-convert``). Plain torch: no Lightning, no Hydra."""

from proteinperformer.checkpoints.files import CheckpointError, read_torch, save_atomic
from proteinperformer.checkpoints.loader import export_slim, load_model, save_checkpoint

__all__ = ["CheckpointError", "export_slim", "load_model", "read_torch", "save_atomic", "save_checkpoint"]
