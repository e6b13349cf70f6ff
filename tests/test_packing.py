"""fedst's wire format for models (shared/packing.py, client/wire.py, server/transport.py): exact round trips,
one object per dtype instead of one per tensor, and a peer's layout checked, never trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.wire import pack_content as site_pack
from client.wire import unpack_content as site_unpack
from server.strategy import arrays_to_numpy, numpy_to_arrays
from server.transport import pack_content as server_pack
from server.transport import unpack_content as server_unpack
from shared.errors import ContractError
from shared.packing import PREFIX, RECORD, pack, unpack


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "scale": np.array(2.5, np.float32),  # a 0-d tensor
        "empty": np.zeros((0, 3), np.float32),
        "steps": np.array([7, 8], np.int64),
        "mask": np.array([True, False]),
        "ema": rng.normal(size=(5,)).astype(np.float64),
    }


def test_pack_round_trip_is_exact_and_keeps_order_names_dtypes():
    state = _state()
    flat, layout = pack(state)
    assert sorted(flat) == sorted(PREFIX + d for d in ("<f4", "<i8", "|b1", "<f8"))
    assert flat[PREFIX + "<f4"].size == 108 + 4 + 1
    back = unpack(flat, layout)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda flat, lay: (flat, "not json"), "not JSON"),
        (lambda flat, lay: (flat, json.dumps({"a": 1})), "not a list"),
        (lambda flat, lay: (flat, json.dumps([["w", "<f4", [-1]]])), "dims >= 0"),
        (lambda flat, lay: (flat, json.dumps(lay + [lay[0]])), "appears twice"),
        (lambda flat, lay: (flat, json.dumps([*lay[:-1], ["ema", "<f8", [6]]])), "more <f8 values"),
        (lambda flat, lay: (flat, json.dumps(lay[1:])), "unused"),
        (lambda flat, lay: (flat, json.dumps([*lay, ["x", "<i4", [1]]])), "no such buffer"),
        (lambda flat, lay: ({**flat, "other": np.zeros(1)}, json.dumps(lay)), "unexpected buffers"),
        (lambda flat, lay: ({**flat, PREFIX + "<f8": flat[PREFIX + "<f8"].astype("<f4")}, json.dumps(lay)), "buffer"),
    ],
)
def test_a_layout_that_does_not_fit_its_buffers_is_refused(tamper, expected):
    flat, layout = pack(_state())
    flat, layout = tamper(dict(flat), json.loads(layout))
    with pytest.raises(ContractError, match=expected):
        unpack(flat, layout)


def test_server_and_site_agree_and_a_model_travels_as_one_array_per_dtype():
    state = {k: v for k, v in _state().items() if v.dtype == np.float32}
    content = RecordDict(
        {"arrays": numpy_to_arrays(state), "central": numpy_to_arrays(state), "config": ConfigRecord({"x": 1})}
    )
    server_pack(content)
    server_pack(content)  # a content shared by every message of a round is packed once
    assert list(content.array_records["arrays"].keys()) == [PREFIX + "<f4"]
    assert set(content.config_records[RECORD]) == {"arrays", "central"}
    assert site_unpack(content) is True and RECORD not in content.config_records
    for name in ("arrays", "central"):
        got = arrays_to_numpy(content.array_records[name])
        assert list(got) == list(state) and all(np.array_equal(got[k], state[k]) for k in state)
    reply = RecordDict({"arrays": numpy_to_arrays(state), "metrics": MetricRecord({"loss": 1.0})})
    site_pack(reply)
    server_unpack(reply)
    assert RECORD not in reply.config_records
    got = arrays_to_numpy(reply.array_records["arrays"])
    assert all(np.array_equal(got[k], state[k]) for k in state)
    assert site_unpack(RecordDict({"arrays": numpy_to_arrays(state)})) is False  # an unpacked message passes


def test_a_reply_with_a_lying_layout_is_left_packed_for_the_screening_to_reject():
    state = {"w": np.ones(4, np.float32)}
    reply = RecordDict({"arrays": numpy_to_arrays(state)})
    site_pack(reply)
    reply[RECORD] = ConfigRecord({"arrays": json.dumps([["w", "<f4", [1000]]])})  # claims more than it sent
    server_unpack(reply)
    assert RECORD in reply.config_records and list(reply.array_records["arrays"].keys()) == [PREFIX + "<f4"]
    with pytest.raises(ContractError):
        site_unpack(reply)
