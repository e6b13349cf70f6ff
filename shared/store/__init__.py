"""Site patch stores: spot-centred patches + tissue tiles + expression, read memory-mapped."""

from shared.store.format import FORMAT_VERSION, PatchStore, StoreWriter, is_store

__all__ = ["FORMAT_VERSION", "PatchStore", "StoreWriter", "is_store"]
