"""The resume state of a training sampler: its epoch and how far into it the run got.

Every training sampler (``EpochShuffleSampler``, ``LengthBucketBatchSampler``, ``ClusterSampler``) draws its
epoch from ``(seed, epoch)`` and skips its first ``start`` positions on this rank, so a run resumed at
``{"epoch": e, "batches": b}`` sees exactly the batches the uninterrupted run saw after its ``b``-th batch of
epoch ``e``. ``ProteinDataModule.state_dict`` stores this in every checkpoint.
"""

from __future__ import annotations


class ResumableSampler:
    """Mixin: ``state_dict`` / ``load_state_dict`` over a sampler's ``epoch``, ``start`` and ``set_epoch(epoch)``
    (which keeps ``start`` when the epoch is unchanged, so Lightning's call at the epoch start keeps the position).

    ``items_per_batch``: for a sampler of items, the DataLoader's batch size (``start`` counts items); None for a
    sampler of batches (``start`` counts batches).
    """

    epoch: int
    start: int
    items_per_batch: int | None = None

    def state_dict(self, batches: int) -> dict[str, int]:
        """``{"epoch", "batches"}``: the current epoch and the ``batches`` of it consumed so far (Lightning's count,
        which the sampler cannot know: DataLoader workers draw ahead of training)."""
        return {"epoch": self.epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue after ``state``: ``{"epoch", "batches"}``, or ``{"epoch", "start"}`` (items) as checkpoints
        written before batch samplers existed hold it."""
        per_batch = self.items_per_batch or 1
        batches = state["batches"] if "batches" in state else state["start"] // per_batch
        self.set_epoch(state["epoch"])
        self.start = batches * per_batch
