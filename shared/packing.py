"""Named tensors as one flat buffer per dtype, for the wire, and back.

Why: Flower 1.41 moves every Array of a message as its own object, one HTTP request per object and per hop
(ServerApp -> SuperLink -> SuperNode -> ClientApp and back: six hops a round). The `tiny` C2L-ST model has 288
tensors, so a 5.7 MB round paid ~15 s of requests on loopback, more than any import or poll. Packed, a model is
one object per dtype (Flower still chunks large buffers itself). The layout (names, dtypes, shapes, in order)
travels beside the buffers as JSON; `unpack` checks it against the buffers before anything is sliced.

Flower-free (numpy only): client/ and server/ wrap it in their own ArrayRecord conversions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from shared.errors import ContractError

PREFIX = "packed-"  # key of one dtype's flat buffer: ``packed-float32``
MAX_TENSORS = 100_000


def pack(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """``state`` as ({``packed-<dtype>``: flat buffer}, layout JSON); names keep their order."""
    layout = []
    groups: dict[str, list[np.ndarray]] = {}
    for name, value in state.items():
        array = np.asarray(value)
        dtype = array.dtype.str if array.dtype.names is None else None
        if dtype is None or array.dtype.hasobject:
            raise ContractError(f"cannot pack tensor {name!r} of dtype {array.dtype}")
        layout.append([str(name), dtype, [int(d) for d in array.shape]])
        groups.setdefault(dtype, []).append(array.reshape(-1))
    flat = {PREFIX + dtype: np.concatenate(parts) if parts else np.zeros(0, dtype) for dtype, parts in groups.items()}
    return flat, json.dumps(layout, separators=(",", ":"))


def unpack(flat: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
    """The named tensors of `pack`'s output (views into the buffers); a `ContractError` when the layout does not
    describe exactly these buffers (a peer's layout is checked, never trusted)."""
    try:
        entries = json.loads(layout)
    except (TypeError, ValueError):
        raise ContractError("packed arrays: the layout is not JSON") from None
    if not isinstance(entries, list) or len(entries) > MAX_TENSORS:
        raise ContractError("packed arrays: the layout is not a list of at most 100000 tensors")
    offsets = dict.fromkeys((k[len(PREFIX) :] for k in flat if k.startswith(PREFIX)), 0)
    if len(offsets) != len(flat):
        raise ContractError(f"packed arrays: unexpected buffers {sorted(k for k in flat if not k.startswith(PREFIX))}")
    state: dict[str, np.ndarray] = {}
    for entry in entries:
        ok = (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
        )
        if not ok:
            raise ContractError("packed arrays: a layout entry is not [name, dtype, [dims >= 0]]")
        name, dtype, shape = entry
        if name in state:
            raise ContractError(f"packed arrays: tensor {name!r} appears twice in the layout")
        if dtype not in offsets:
            raise ContractError(f"packed arrays: tensor {name!r} has dtype {dtype!r} but no such buffer was sent")
        buffer = np.asarray(flat[PREFIX + dtype])
        if buffer.dtype.str != dtype or buffer.ndim != 1:
            raise ContractError(f"packed arrays: buffer {PREFIX + dtype} is {buffer.dtype} {buffer.shape}")
        size = int(np.prod(shape, dtype=np.int64))
        start = offsets[dtype]
        if start + size > buffer.size:
            raise ContractError(f"packed arrays: the layout needs more {dtype} values than the buffer holds")
        state[name] = buffer[start : start + size].reshape(shape)
        offsets[dtype] = start + size
    unused = [d for d, used in offsets.items() if used != np.asarray(flat[PREFIX + d]).size]
    if unused:
        raise ContractError(f"packed arrays: the layout leaves values of buffers {unused} unused")
    return state


RECORD = "fedst-packing"
"""ConfigRecord of a packed message: the name of each packed ArrayRecord -> its layout JSON."""

PACKED_MESSAGE_TYPES = ("train.pretrain", "train.adapt")
"""fedst's model-carrying messages, packed on the wire (SecAgg+'s legacy ``train`` messages are Flower's own)."""
