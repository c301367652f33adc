"""Inference: embeddings (:mod:`.embed`, the files of ``pp-embed`` in :mod:`.embed_files`) and sampling from a
CLM (:mod:`.generate`). Models come from :func:`proteinperformer.checkpoints.load_model`."""
