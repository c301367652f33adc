"""The token store: FASTA streamed into memory-mapped shards (``pp-preprocess``) and read back for training.

- :mod:`.preprocess` — the pipeline (read → parse/encode shards → finalize), resumable.
- :mod:`.build` — stages 1–2: binary blocks of FASTA → one shard each.
- :mod:`.finalize` — stage 3: filters, duplicates, accession-hash splits, indexes, manifest.
- :mod:`.reader` — :class:`TokenStore` / :func:`open_store`, the memory-mapped reader.
"""

from proteinperformer.data.store.reader import (
    SPLIT_NAMES,
    STORE_VERSION,
    ShardReader,
    StoreError,
    StoreSequences,
    TokenStore,
    open_store,
)

__all__ = ["SPLIT_NAMES", "STORE_VERSION", "ShardReader", "StoreError", "StoreSequences", "TokenStore", "open_store"]
