"""The site side of fedst's wire format (shared/packing.py): a packed message's ArrayRecords back to named
tensors before a handler sees them, and the reply's packed the same way. numpy and Flower only (the shim imports
no torch)."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from shared.packing import RECORD, pack, unpack


def _record(state) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in state.items()})


def unpack_content(content: RecordDict) -> bool:
    """Unpack ``content`` in place; whether it was packed."""
    layouts = content.config_records.get(RECORD)
    if layouts is None:
        return False
    for name, layout in layouts.items():
        record = content.array_records[name]
        content[name] = _record(unpack(dict(zip(record.keys(), record.to_numpy_ndarrays())), str(layout)))
    del content[RECORD]
    return True


def pack_content(content: RecordDict) -> None:
    """Pack every ArrayRecord of ``content`` in place, with the layouts in ConfigRecord ``fedst-packing``."""
    layouts = {}
    for name, record in list(content.array_records.items()):
        flat, layouts[name] = pack(dict(zip(record.keys(), record.to_numpy_ndarrays())))
        content[name] = _record(flat)
    if layouts:
        content[RECORD] = ConfigRecord(layouts)
