"""app.features: three candidate forms x two encodings -> one int64 matrix, OOV, errors."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import numpy as np
import pytest

from app.errors import InvalidRequest, MalformedBody
from app.features import FeatureSpace, OOVCounter, detect_form, error_from_msgspec
from app.schema import CardField, RankRequest
from tests.conftest import FIELD_NAMES, VOCAB, as_form
from tests.fake_models import FIELDS

MAX = 8
FORMS = ("objects", "rows", "columns")
KINDS = ("json", "msgpack")
ROWS = [[0, 0, 0, 0], [6, 23, 34, 399], [3, 12, 7, 150], [1, 2, 3, 4]]


def space(max_candidates: int = MAX) -> FeatureSpace:
    return FeatureSpace([CardField(n, v, v) for n, v in FIELDS], max_candidates)


def encode(value: Any, kind: str) -> bytes:
    return msgspec.json.encode(value) if kind == "json" else msgspec.msgpack.encode(value)


def raw_of(value: Any, kind: str) -> msgspec.Raw:
    """The ``candidates`` value as the API hands it over: a Raw cut from a request body."""
    body = encode({"candidates": value}, kind)
    mod = msgspec.json if kind == "json" else msgspec.msgpack
    return mod.decode(body, type=RankRequest).candidates


def decode(value: Any, kind: str = "json", fs: FeatureSpace | None = None):
    return (fs or space()).decode(raw_of(value, kind), kind)


def invalid(value: Any, kind: str = "json", fs: FeatureSpace | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode(value, kind, fs)
    assert " - at `" not in info.value.message  # the path moved to .field
    return info.value


# -- forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_and_kind_gives_the_same_matrix(form: str, kind: str) -> None:
    ids, detected = decode(as_form(ROWS, form), kind)
    assert detected == form
    assert ids.dtype == np.int64
    assert ids.flags["C_CONTIGUOUS"]
    assert ids.shape == (len(ROWS), len(FIELDS))
    np.testing.assert_array_equal(ids, np.array(ROWS, dtype=np.int64))


@pytest.mark.parametrize("kind", KINDS)
def test_object_key_order_does_not_matter(kind: str) -> None:
    shuffled = [{n: row[i] for i, n in reversed(list(enumerate(FIELD_NAMES)))} for row in ROWS]
    ids, form = decode(shuffled, kind)
    assert form == "objects"
    np.testing.assert_array_equal(ids, ROWS)


@pytest.mark.parametrize("kind", KINDS)
def test_single_candidate_decode_one(kind: str) -> None:
    fs = space()
    value = {"weekday": 2, "hour": 99, "region": 5, "city": 10}
    ids = fs.decode_one(encode(value, kind), kind)
    np.testing.assert_array_equal(ids, [[2, VOCAB["hour"], 5, 10]])
    assert fs.oov_counter.snapshot()["hour"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_decode_one_rejects_an_array(kind: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        space().decode_one(encode([ROWS[0]], kind), kind)
    assert info.value.field == "candidate"


# -- detect_form ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'[{"weekday": 1', "objects"),
        (b"[[1, 2, 3, 4]]", "rows"),
        (b'{"weekday": [1', "columns"),
        (b" \t\r\n[ \n\t[1, 2", "rows"),
        (b"\n  [\n    {", "objects"),
        (b"  {", "columns"),
        (b"[]", "empty"),
        (b"[ \n ]", "empty"),
        (b"", None),
        (b" \n\t ", None),
        (b"null", None),
        (b'"abc"', None),
        (b"42", None),
        (b"true", None),
        # The first element is past the 16 bytes the caller shows: decoded as objects.
        (b"[" + b" " * 15, "objects"),
    ],
)
def test_detect_form_json(head: bytes, expected: str | None) -> None:
    assert detect_form(head, "json") == expected


ROW = [1, 2, 3, 4]
OBJ = dict(zip(FIELD_NAMES, ROW, strict=True))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([ROW], "rows"),
        ([OBJ], "objects"),
        ({n: [1] for n in FIELD_NAMES}, "columns"),
        ([], "empty"),
        ([ROW] * 15, "rows"),  # fixarray, last size
        ([ROW] * 16, "rows"),  # array16
        ([OBJ] * 16, "objects"),
        ([ROW] * 65_535, "rows"),  # array16, largest
        ([ROW] * 65_536, "rows"),  # array32
        ([OBJ] * 65_536, "objects"),
        ([list(range(16))], "rows"),  # rows of array16
        ([dict.fromkeys(map(str, range(16)), 0)], "objects"),  # objects of map16
        ({str(i): [1] for i in range(16)}, "columns"),  # map16
        (None, None),
        ("abc", None),
        (7, None),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_detect_form_msgpack(value: Any, expected: str | None) -> None:
    body = msgspec.msgpack.encode(value)
    assert detect_form(body[:16], "msgpack") == expected


def test_msgpack_headers_are_the_ones_meant() -> None:
    """Guard the table above: it covers fixarray, array16 and array32 headers."""
    assert msgspec.msgpack.encode([ROW] * 15)[0] == 0x9F
    assert msgspec.msgpack.encode([ROW] * 16)[0] == 0xDC
    assert msgspec.msgpack.encode([ROW] * 65_536)[0] == 0xDD
    assert msgspec.msgpack.encode([list(range(16))])[1] == 0xDC


@pytest.mark.parametrize(
    "head",
    [b"", b"\xdc", b"\xdc\x00", b"\xdd\x00\x00\x00", b"\xc0", b"\xa3abc", b"\x07"],
)
def test_detect_form_msgpack_short_or_wrong_heads(head: bytes) -> None:
    assert detect_form(head, "msgpack") is None


@pytest.mark.parametrize("empty", [b"\x90", b"\xdc\x00\x00", b"\xdd\x00\x00\x00\x00"])
def test_detect_form_msgpack_empty_arrays(empty: bytes) -> None:
    assert detect_form(empty, "msgpack") == "empty"


@pytest.mark.parametrize(
    ("n", "form"), [(16, "rows"), (16, "objects"), (70_000, "rows"), (70_000, "columns")]
)
@pytest.mark.parametrize("kind", KINDS)
def test_long_bodies_decode_identically(n: int, form: str, kind: str) -> None:
    rows = (np.arange(n * 4).reshape(n, 4) % np.array([7, 24, 35, 400])).tolist()
    ids, detected = decode(as_form(rows, form), kind, space(max_candidates=n))
    assert detected == form
    np.testing.assert_array_equal(ids, rows)


def test_rows_after_long_whitespace_are_rows() -> None:
    raw = b"[" + b" " * 16 + b"[0, 1, 2, 3]]"
    ids, form = space().decode(raw, "json")
    assert form == "rows"
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3]])


# -- OOV -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "mapped"),
    [
        ("weekday", 0, 0),
        ("weekday", 6, 6),
        ("weekday", 7, 7),
        ("weekday", -1, 7),
        ("hour", 24, 24),
        ("hour", 23, 23),
        ("hour", -5, 24),
        ("region", 2**62, 35),
        ("region", 2**63 - 1, 35),
        ("city", -(2**63), 400),
        ("city", 400, 400),
        ("city", 399, 399),
        ("city", 10**12, 400),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_oov_ids_map_to_the_oov_index_and_are_counted(
    form: str, kind: str, field: str, value: int, mapped: int
) -> None:
    fs = space()
    col = FIELD_NAMES.index(field)
    row = [1, 1, 1, 1]
    row[col] = value
    ids, _ = decode(as_form([[1, 1, 1, 1], row], form), kind, fs)
    expected = [1, 1, 1, 1]
    expected[col] = mapped
    np.testing.assert_array_equal(ids, [[1, 1, 1, 1], expected])
    out_of_vocab = not 0 <= value < VOCAB[field]
    assert fs.oov_counter.snapshot() == {n: int(n == field and out_of_vocab) for n in FIELD_NAMES}


def test_oov_counts_accumulate_per_field() -> None:
    fs = space()
    decode([[-1, 24, 2, 3], [7, 99, 35, 0], [0, 0, 0, 400]], "json", fs)
    assert fs.oov_counter.snapshot() == {"weekday": 2, "hour": 2, "region": 1, "city": 1}
    decode({"weekday": [9], "hour": [0], "region": [0], "city": [-3]}, "msgpack", fs)
    assert fs.oov_counter.snapshot() == {"weekday": 3, "hour": 2, "region": 1, "city": 2}


def test_oov_counter_is_thread_safe() -> None:
    counter = OOVCounter(["a", "b"])
    one = np.array([1, 2], dtype=np.int64)

    def work() -> None:
        for _ in range(2000):
            counter.add(one)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.snapshot() == {"a": 8000, "b": 16000}


# -- invalid requests ----------------------------------------------------------------------
GOOD = dict(zip(FIELD_NAMES, [1, 2, 3, 4], strict=True))


def objects_with(index: int, **change: Any) -> list[dict[str, Any]]:
    rows = [dict(GOOD) for _ in range(index + 1)]
    rows[index].update(change)
    return [{k: v for k, v in r.items() if v is not ...} for r in rows]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (objects_with(3, hour=2**63), "candidates[3].hour"),
        (objects_with(2, hour=1.0), "candidates[2].hour"),
        (objects_with(1, hour=1.5), "candidates[1].hour"),
        (objects_with(1, region="3"), "candidates[1].region"),
        (objects_with(0, weekday=True), "candidates[0].weekday"),
        (objects_with(0, weekday=None), "candidates[0].weekday"),
        (objects_with(0, weekday=[1]), "candidates[0].weekday"),
        (objects_with(2, city=...), "candidates[2]"),
        (objects_with(1, colour=3), "candidates[1]"),
        ([GOOD, [1, 2, 3, 4]], "candidates[1]"),
        ([[1, 2, 3, 4], [1, 2, 3]], "candidates[1]"),
        ([[1, 2, 3, 4], [1, 2, 3, 4, 5]], "candidates[1]"),
        ([[1, 2, 3, 4], [1, 2, 2**63, 4]], "candidates[1][2]"),
        ([[1, 2, 3, 4], [1, 2, "x", 4]], "candidates[1][2]"),
        ([[1, 2, 3, 4], GOOD], "candidates[1]"),
        ({"weekday": [1, 2], "hour": [1, 2], "region": [1, 2]}, "candidates"),
        ({**{n: [1] for n in FIELD_NAMES}, "colour": [1]}, "candidates"),
        ({**{n: [1] for n in FIELD_NAMES}, "hour": [1, 2.5]}, "candidates.hour[1]"),
        ({**{n: [1] for n in FIELD_NAMES}, "hour": []}, "candidates.hour"),
        ({**{n: [1] for n in FIELD_NAMES}, "city": 3}, "candidates.city"),
        ([GOOD] * (MAX + 1), "candidates"),
        ([[1, 2, 3, 4]] * (MAX + 1), "candidates"),
        ({n: [1] * (MAX + 1) for n in FIELD_NAMES}, "candidates.weekday"),
        ([], "candidates"),
        ({}, "candidates"),
        (None, "candidates"),
        ("abc", "candidates"),
        (3, "candidates"),
        ([1, 2, 3], "candidates[0]"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_candidates_name_the_field(kind: str, value: Any, field: str) -> None:
    assert invalid(value, kind).field == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'[{"weekday": 1, "hour": 18446744073709551616, "region": 1, "city": 1}]', "hour"),
        (b'[{"weekday": 1, "hour": 1e3, "region": 1, "city": 1}]', "hour"),
        (b'[{"weekday": 1, "hour": 1, "region": 1, "city": -9223372036854775809}]', "city"),
        (b"[[1, 2, 3, 99999999999999999999999]]", "[3]"),
    ],
)
def test_json_numbers_beyond_int64_are_invalid(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        space().decode(raw, "json")
    sep = "" if field.startswith("[") else "."
    assert info.value.field == f"candidates[0]{sep}{field}"


BEYOND = {"json": (2**63, -(2**63) - 1, 10**30), "msgpack": (2**63, 2**64 - 1)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("kind", "value"), [(k, v) for k in KINDS for v in BEYOND[k]])
def test_an_id_beyond_int64_is_invalid_in_every_form(form: str, kind: str, value: int) -> None:
    """The hot decoders take any int; packing it into int64 fails and the strict decode
    names the id, with msgspec's own message."""
    rows = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, value]]
    err = invalid(as_form(rows, form), kind)
    expected = {
        "objects": "candidates[2].city",
        "rows": "candidates[2][3]",
        "columns": "candidates.city[2]",
    }
    assert err.field == expected[form]
    bound = "<= 9223372036854775807" if value > 0 else ">= -9223372036854775808"
    assert err.message == f"Expected `int` {bound}"


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_candidate_beyond_int64_is_invalid(kind: str) -> None:
    raw = encode({**GOOD, "region": 2**63}, kind)
    with pytest.raises(InvalidRequest) as info:
        space().decode_one(raw, kind)
    assert info.value.field == "candidate.region"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        # the first bad value in the body is named, whichever comes first
        (objects_with(1, hour=2**63) + objects_with(0, hour="x"), "candidates[1].hour"),
        (objects_with(1, hour="x") + objects_with(0, hour=2**63), "candidates[1].hour"),
        ([[1, 2, 3, 2**63], [1, 2, 3]], "candidates[0][3]"),
        ([[1, 2, 3], [1, 2, 3, 2**63]], "candidates[0]"),
        # an id beyond int64 is named before ragged columns
        ({"weekday": [1, 2], "hour": [1], "region": [1], "city": [2**63]}, "candidates.city[0]"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_beyond_int64_and_another_error_name_the_first(kind: str, raw: Any, field: str) -> None:
    assert invalid(raw, kind).field == field


def test_beyond_int64_is_named_before_a_repeated_key() -> None:
    body = b'[{"weekday": 1, "hour": 1, "region": 1, "city": 9223372036854775808, "city": 1}]'
    with pytest.raises(InvalidRequest) as info:
        space().decode(body, "json")
    assert info.value.field == "candidates[0].city"
    assert info.value.message == "Expected `int` <= 9223372036854775807"


def test_ragged_columns_name_the_longest_column() -> None:
    value = {"weekday": [1, 2], "hour": [1, 2, 3], "region": [1, 2], "city": [1, 2]}
    err = invalid(value)
    assert err.field == "candidates.hour"
    assert "[2, 3]" in err.message


def test_a_rejected_request_counts_no_oov() -> None:
    fs = space()
    with pytest.raises(InvalidRequest):
        decode([[-1, 1, 1, 1], [1, 2, 3]], "json", fs)
    assert set(fs.oov_counter.snapshot().values()) == {0}


def test_max_candidates_boundary_is_inclusive() -> None:
    ids, _ = decode([[1, 2, 3, 4]] * MAX)
    assert ids.shape == (MAX, 4)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'[{"weekday": 1, "hour":', "json"),
        (b"[[1, 2, 3, 4]", "json"),
        (b"[[1, 2, 3, 4]]]", "json"),
        (b"[[1, 2, 3, tru]]", "json"),
        (b"\x91\x94\x01\x02", "msgpack"),  # truncated
        (b"\x91\x94\x01\x02\x03\x04\xff", "msgpack"),  # trailing byte
    ],
)
def test_malformed_bytes_are_malformed_body(raw: bytes, kind: str) -> None:
    with pytest.raises(MalformedBody) as info:
        space().decode(raw, kind)
    assert info.value.status == 400
    assert info.value.code == "malformed_body"


# -- error_from_msgspec --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "prefix", "kind", "message", "field"),
    [
        (
            msgspec.ValidationError("Expected `int`, got `str` - at `$[3].hour`"),
            "candidates",
            InvalidRequest,
            "Expected `int`, got `str`",
            "candidates[3].hour",
        ),
        (
            msgspec.ValidationError("Expected `int` >= 1 - at `$.top_k`"),
            "",
            InvalidRequest,
            "Expected `int` >= 1",
            "top_k",
        ),
        (
            msgspec.ValidationError("Expected `array` of length <= 8 - at `$`"),
            "candidates",
            InvalidRequest,
            "Expected `array` of length <= 8",
            "candidates",
        ),
        (
            msgspec.ValidationError("Expected `object`, got `array`"),
            "",
            InvalidRequest,
            "Expected `object`, got `array`",
            None,
        ),
        (
            msgspec.ValidationError("Object missing required field `candidates`"),
            "",
            InvalidRequest,
            "Object missing required field `candidates`",
            None,
        ),
        (
            msgspec.ValidationError("Expected `int` - at `$.hour[2]`"),
            "candidates",
            InvalidRequest,
            "Expected `int`",
            "candidates.hour[2]",
        ),
        (
            msgspec.DecodeError("JSON is malformed: invalid character (byte 5)"),
            "",
            MalformedBody,
            "JSON is malformed: invalid character (byte 5)",
            None,
        ),
        (
            msgspec.DecodeError("Input data was truncated"),
            "candidate",
            MalformedBody,
            "Input data was truncated",
            "candidate",
        ),
    ],
)
def test_error_from_msgspec(
    exc: msgspec.MsgspecError, prefix: str, kind: type, message: str, field: str | None
) -> None:
    err = error_from_msgspec(exc, prefix)
    assert type(err) is kind
    assert (err.message, err.field) == (message, field)


def test_error_from_msgspec_on_real_errors() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"candidates": [], "top_k": 0}', type=RankRequest)
    err = error_from_msgspec(info.value, "")
    assert isinstance(err, InvalidRequest)
    assert err.field == "top_k"
    assert "`$" not in err.message


# -- repeated keys -------------------------------------------------------------------------
OBJ_TEXT = b'{"weekday": 1, "hour": 2, "region": 3, "city": 4'


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"[" + OBJ_TEXT + b', "hour": 5}]', "candidates[0].hour"),
        (b"[" + OBJ_TEXT + b"}, " + OBJ_TEXT + b', "city": 4}]', "candidates[1].city"),
        # An escaped key is the same key.
        (b"[" + OBJ_TEXT + b', "h\\u006fur": 5}]', "candidates[0].hour"),
        (
            b'{"weekday": [1], "hour": [2], "region": [3], "city": [4], "weekday": [5]}',
            "candidates.weekday",
        ),
    ],
)
def test_a_repeated_json_key_is_invalid_and_named(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        space().decode(raw, "json")
    assert info.value.field == field
    assert "repeated key" in info.value.message


def test_a_repeated_key_in_a_single_json_candidate_is_invalid() -> None:
    with pytest.raises(InvalidRequest) as info:
        space().decode_one(OBJ_TEXT + b', "region": 9}', "json")
    assert info.value.field == "candidate.region"


def msgpack_map(pairs: list[tuple[str, Any]]) -> bytes:
    """A msgpack map with exactly these pairs (repeats kept: a dict would merge them)."""
    assert len(pairs) <= 15
    return bytes([0x80 | len(pairs)]) + b"".join(
        msgspec.msgpack.encode(k) + msgspec.msgpack.encode(v) for k, v in pairs
    )


GOOD_PAIRS = list(GOOD.items())


@pytest.mark.parametrize(
    ("call", "raw", "field"),
    [
        ("decode_one", msgpack_map([*GOOD_PAIRS, ("hour", 5)]), "candidate"),
        ("decode", msgpack_map([(k, [v]) for k, v in GOOD_PAIRS] + [("city", [9])]), "candidates"),
    ],
)
def test_a_repeated_msgpack_key_is_invalid(call: str, raw: bytes, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        getattr(space(), call)(raw, "msgpack")
    assert info.value.field == field


def test_a_repeated_key_in_msgpack_objects_keeps_the_last_value() -> None:
    """Documented (README, Errors): no cheap exact check for a list of msgpack maps."""
    raw = b"\x91" + msgpack_map([*GOOD_PAIRS, ("hour", 5)])
    ids, form = space().decode(raw, "msgpack")
    assert form == "objects"
    np.testing.assert_array_equal(ids, [[1, 5, 3, 4]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_no_repeat_is_never_rejected(form: str, kind: str) -> None:
    """Whitespace and escaped keys do not confuse the count."""
    ids, _ = decode(as_form(ROWS, form), kind)
    assert ids.shape == (len(ROWS), len(FIELDS))
    spaced = (
        b"[ {\n"
        + b" ,\n".join(
            b'"\\u00%x%s" :  %d' % (ord(n[0]), n[1:].encode(), i) for i, n in enumerate(FIELD_NAMES)
        )
        + b"\n} ]"
    )
    ids, _ = space().decode(spaced, "json")
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3]])


# -- errors Python raises through msgspec ---------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "call"),
    [
        (b'[{"\xff\xfe": 1}]', "decode"),
        (b'{"\xc3\x28": 1}', "decode_one"),
    ],
)
def test_invalid_utf8_in_a_key_is_malformed(raw: bytes, call: str) -> None:
    with pytest.raises(MalformedBody) as info:
        getattr(space(), call)(raw, "json")
    assert info.value.message == "body holds invalid UTF-8"


def test_deep_nesting_is_malformed_not_a_recursion_error() -> None:
    deep = b'{"candidates": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(RecursionError) as info:
        msgspec.json.decode(deep, type=RankRequest)
    err = error_from_msgspec(info.value, "")
    assert isinstance(err, MalformedBody)
    assert (err.message, err.field) == ("body is nested too deeply", None)
