"""Training: the Lightning module (:class:`~.lm.ProteinLM`), its callbacks, the precision check and
:func:`~.train.train`, which wires a composed Hydra config together (entry point: ``proteinperformer.cli.train``).

Imports Lightning and Hydra; nothing below it (``attention/``, ``model/``, ``checkpoints/``) imports this.
"""
