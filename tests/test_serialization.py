import pickle
import threading

import numpy as np
import pytest

from redisengines.errors import DeserializationError, ObjectTooBigError, SerializationError
from redisengines.serialization import (
    OUT_OF_BAND_MIN,
    check_size,
    dumps,
    pack,
    serialize,
    to_pickle,
    unpack,
    unpack_segments,
)


def test_small_values_round_trip_in_one_segment() -> None:
    value = {"a": [1, 2.5, "x"], "f": lambda x: x + 1}
    ser = serialize(value)
    assert len(ser.segments) == 1
    back = unpack(pack(ser))
    assert back["a"] == [1, 2.5, "x"] and back["f"](1) == 2


def test_large_array_travels_out_of_band_without_copy() -> None:
    arr = np.arange(OUT_OF_BAND_MIN, dtype=np.float64)
    ser = serialize({"arr": arr})
    assert len(ser.segments) == 2
    assert ser.segments[1].nbytes == arr.nbytes
    assert np.shares_memory(np.frombuffer(ser.segments[1], dtype=np.float64), arr)
    back = unpack(pack(ser))["arr"]
    assert np.array_equal(back, arr)
    back[0] = -1.0  # arrays read back are writable
    assert back[0] == -1.0


def test_non_contiguous_array_is_copied_in_band() -> None:
    arr = np.arange(4 * OUT_OF_BAND_MIN, dtype=np.float64)[::4]
    assert np.array_equal(unpack(dumps(arr)), arr)


def test_unpicklable_object_names_what_failed() -> None:
    with pytest.raises(SerializationError, match="'lock'.*lock"):
        serialize(threading.Lock(), what="'lock'")


def test_check_size_reports_size_and_limit() -> None:
    ser = serialize(b"x" * 1000)
    check_size(ser, 10_000)
    with pytest.raises(ObjectTooBigError) as err:
        check_size(ser, 100)
    assert err.value.size == ser.nbytes and err.value.limit == 100


@pytest.mark.parametrize("frame", [b"", b"XYZ", b"RE1\x01\x00", dumps([1, 2])[:-1],
                                   dumps([1, 2]) + b"!"])
def test_corrupt_frames_raise_deserialization_error(frame: bytes) -> None:
    with pytest.raises(DeserializationError):
        unpack(frame)


def test_bad_pickle_in_a_good_frame() -> None:
    frame = pack(serialize(1))
    bad = frame[:-2] + b"\x00\x00"
    with pytest.raises(DeserializationError, match="cannot deserialize"):
        unpack(bad)


def test_unpack_segments_gives_writable_buffers() -> None:
    arr = np.ones(OUT_OF_BAND_MIN, dtype=np.uint8)
    segments = unpack_segments(dumps(arr))
    assert isinstance(segments[1], bytearray)


def test_to_pickle_is_plain_pickle() -> None:
    arr = np.arange(OUT_OF_BAND_MIN)
    assert np.array_equal(pickle.loads(to_pickle(arr)), arr)
    with pytest.raises(SerializationError):
        to_pickle(threading.Lock())


@pytest.mark.parametrize("value", [None, 3, ("fn", b"\x00" * 300, (1, 2.5, "x"),
                                              {"k": [True, None]})])
def test_plain_values_pickle_as_cloudpickle_would(value) -> None:
    import cloudpickle

    assert bytes(serialize(value).segments[0]) == cloudpickle.dumps(value, protocol=5)


def test_values_that_are_not_plain_go_by_value() -> None:
    # Defined here (not importable by an engine): cloudpickle sends them by value, also
    # inside containers the standard pickler would otherwise take.
    def local(x):
        return x + 1

    class Local:
        pass

    for value in ([local], {"f": local}, (Local(),), {1: "int key"}, [[[[1]]]]):
        back = unpack(pack(serialize(value)))
        assert type(back) is type(value)
    assert unpack(pack(serialize([local])))[0](1) == 2


def test_a_long_list_is_refused_as_plain_without_being_copied() -> None:
    """The plain check looks at 64 items in all: a long list is refused by its length, not
    copied item by item onto a work list first (which took 300 ms for 10,000,000 items)."""
    import tracemalloc

    from redisengines.serialization import _plain

    long = list(range(1_000_000))
    tracemalloc.start()
    try:
        assert _plain([1, long]) is False
        assert _plain({"a": long}) is False
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"the check allocated {peak:,} bytes"
    assert _plain([0] * 64) is True and _plain([0] * 65) is False
