"""Evaluation: linear probes against sequence-only baselines (:mod:`.probe`, :mod:`.go`, :mod:`.baselines`),
what the exact → FAVOR+ conversion costs (:mod:`.conversion`) and the model card (:mod:`.card`)."""
