"""Content hashes that tie adapters to the central weights they were trained on (saving: shared/persistence.py)."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping


def weights_hash(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor (order-independent, device-independent)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
