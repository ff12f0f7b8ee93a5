"""Fault suite item 1 (issue 6): property-based fuzzing of the decoder and of ``/rank``.

- Unit (no stack): :meth:`FeatureSpace.decode` / ``decode_one`` on JSON and msgpack, all
  three forms, for valid candidates (the exact OOV-mapped matrix comes back), arbitrary
  JSON-ish / msgpack-ish values and byte-mutated valid bodies: either an int64 matrix
  ``[n, k]`` with every id in its vocabulary or its OOV index, or a ``ClientError``;
  never any other exception.
- Integration (real stack, bounded): mutated ``/rank`` bodies (dropped and extra fields,
  type swaps, byte flips, insertions, truncation) through nginx: 200 or a documented 4xx
  with the error shape, never a 5xx, and no worker restarted.

Runs are derandomized (same examples every run, no example database), with no deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ClientError
from app.features import INT64_MAX, INT64_MIN, FeatureSpace
from app.schema import CardField
from app.stack import Stack
from tests.fake_models import FIELDS
from tests.faults.corpus import JSON, MSGPACK
from tests.integration.conftest import Candidates

MAX = 8
NAMES = [name for name, _ in FIELDS]
VOCAB = np.array([v for _, v in FIELDS], dtype=np.int64)
FORMS = ("objects", "rows", "columns")
KINDS = ("json", "msgpack")
UNIT = settings(max_examples=300, deadline=None, derandomize=True, database=None, print_blob=False)
#: /rank examples: bounded (about 2-3 s through the stack on 2 busy cores).
HTTP_EXAMPLES = 150
HTTP = settings(
    max_examples=HTTP_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def space() -> FeatureSpace:
    return FeatureSpace([CardField(n, v, v) for n, v in FIELDS], MAX)


def encode(value: Any, kind: str) -> bytes:
    return msgspec.json.encode(value) if kind == "json" else msgspec.msgpack.encode(value)


def as_form(rows: list[list[int]], form: str, names: list[str]) -> Any:
    if form == "objects":
        return [dict(zip(names, row, strict=True)) for row in rows]
    if form == "columns":
        return {n: [row[j] for row in rows] for j, n in enumerate(names)}
    return rows


def decoded_or_client_error(call: Callable[[], np.ndarray], n_max: int) -> np.ndarray | None:
    """The decoder's contract: a well-formed id matrix, or a ClientError (None)."""
    try:
        ids = call()
    except ClientError as exc:
        assert 400 <= exc.status < 500 and exc.code and exc.message
        return None
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.flags["C_CONTIGUOUS"]
    assert ids.ndim == 2 and ids.shape[1] == len(NAMES) and 1 <= ids.shape[0] <= n_max
    assert (((ids >= 0) & (ids < VOCAB)) | (ids == VOCAB)).all()  # oov_index == vocab here
    return ids


# -- strategies ----------------------------------------------------------------------------
ids_st = st.one_of(
    st.integers(-2, 450),  # in and around the (small) vocabularies
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, -1, 0]),
)
rows_st = st.lists(
    st.lists(ids_st, min_size=len(NAMES), max_size=len(NAMES)), min_size=1, max_size=MAX
)
keys_st = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))


def scalars(kind: str) -> st.SearchStrategy[Any]:
    # JSON numbers have no range; msgpack ints stop at int64 / uint64.
    lo, hi = (-(2**70), 2**70) if kind == "json" else (INT64_MIN, 2**64 - 1)
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(lo, hi),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    )


def values(kind: str) -> st.SearchStrategy[Any]:
    """Arbitrary JSON-ish (or msgpack-ish: bytes, exts, int keys) values that tend to look
    like candidates: field-name keys, short lists, ints."""
    leaves = scalars(kind)
    keys = keys_st
    if kind == "msgpack":
        ext = st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=4))
        leaves = st.one_of(leaves, st.binary(max_size=8), ext)
        keys = st.one_of(keys_st, st.integers(-5, 5))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=MAX + 1), st.dictionaries(keys, inner, max_size=6)
        ),
        max_leaves=40,
    )


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` after a few byte-level edits: flip, insert, delete a slice, truncate."""
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


# -- unit: the decoder ---------------------------------------------------------------------
@UNIT
@given(rows=rows_st, form=st.sampled_from(FORMS), kind=st.sampled_from(KINDS), data=st.data())
def test_valid_candidates_decode_to_the_mapped_matrix(
    rows: list[list[int]], form: str, kind: str, data: st.DataObject
) -> None:
    names = data.draw(st.permutations(NAMES)) if form == "objects" else NAMES
    order = [NAMES.index(n) for n in names]
    shuffled = [[row[j] for j in order] for row in rows] if form == "objects" else rows
    raw = encode(as_form(shuffled, form, names), kind)
    ids = decoded_or_client_error(lambda: space().decode(raw, kind)[0], MAX)
    expected = np.array(rows, dtype=np.int64)
    expected = np.where((expected < 0) | (expected >= VOCAB), VOCAB, expected)
    assert ids is not None
    np.testing.assert_array_equal(ids, expected)


@UNIT
@given(data=st.data(), kind=st.sampled_from(KINDS), one=st.booleans())
def test_arbitrary_values_decode_or_raise_a_client_error(
    data: st.DataObject, kind: str, one: bool
) -> None:
    value = data.draw(values(kind))
    raw = encode(value, kind)
    fs = space()
    decode = (lambda: fs.decode_one(raw, kind)) if one else (lambda: fs.decode(raw, kind)[0])
    decoded_or_client_error(decode, 1 if one else MAX)


@UNIT
@given(rows=rows_st, form=st.sampled_from(FORMS), kind=st.sampled_from(KINDS), data=st.data())
def test_mutated_bodies_decode_or_raise_a_client_error(
    rows: list[list[int]], form: str, kind: str, data: st.DataObject
) -> None:
    raw = data.draw(mutated(encode(as_form(rows, form, NAMES), kind)))
    decoded_or_client_error(lambda: space().decode(raw, kind)[0], MAX)
    single = data.draw(mutated(encode(as_form(rows[:1], "objects", NAMES)[0], kind)))
    decoded_or_client_error(lambda: space().decode_one(single, kind), 1)


# -- integration: /rank through the real stack ----------------------------------------------
def mutate_candidates(draw: st.DrawFn, cands: Any, kind: str, swap: bool) -> None:
    """Swap one candidate (or column) for an arbitrary value, or drop one of its fields."""
    if isinstance(cands, dict) and cands:
        col = draw(st.sampled_from(sorted(cands, key=repr)))
        if swap:
            cands[col] = draw(values(kind))
        else:
            del cands[col]
    elif isinstance(cands, list) and cands:
        i = draw(st.integers(0, len(cands) - 1))
        item = cands[i]
        if swap:
            cands[i] = draw(values(kind))
        elif isinstance(item, dict) and item:
            del item[draw(st.sampled_from(sorted(item, key=repr)))]
        elif isinstance(item, list) and item:
            del item[draw(st.integers(0, len(item) - 1))]


@st.composite
def rank_bodies(draw: st.DrawFn, cands: Candidates) -> tuple[str, bytes]:
    """A valid /rank body, then value-level and byte-level mutations."""
    kind = draw(st.sampled_from(KINDS))
    n = draw(st.integers(1, 20))
    rows = cands.ids(n, seed=draw(st.integers(0, 2**16))).tolist()
    body: dict[str, Any] = {"candidates": as_form(rows, draw(st.sampled_from(FORMS)), cands.names)}
    top_k = draw(st.integers(1, 10))
    body.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "top_k": st.just(top_k),
                    "stage1_k": st.integers(top_k, 200),
                    "multi_stage": st.booleans(),
                },
            )
        )
    )
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["drop", "extra", "swap", "drop-inner", "swap-inner"]))
        key = draw(st.sampled_from(sorted(body, key=repr)))
        if op == "drop":
            del body[key]
        elif op == "extra":
            body[draw(keys_st)] = draw(scalars(kind))
        elif op == "swap":
            body[key] = draw(values(kind))
        else:
            mutate_candidates(draw, body.get("candidates"), kind, swap=op == "swap-inner")
        if not body:
            break
    raw = encode(body, kind)
    if draw(st.booleans()):
        raw = draw(mutated(raw))
    return (JSON if kind == "json" else MSGPACK), raw


@pytest.mark.integration
def test_fuzzed_rank_bodies_never_get_a_5xx(
    fault_stack: Stack,
    fault_client: httpx.Client,
    fault_candidates: Candidates,
    worker_pids: Callable[[], list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pids = worker_pids()
    seen: Counter[int] = Counter()

    @HTTP
    @given(case=rank_bodies(fault_candidates))
    def post(case: tuple[str, bytes]) -> None:
        ctype, body = case
        resp = fault_client.post("/rank", content=body, headers={"Content-Type": ctype})
        seen[resp.status_code] += 1
        assert resp.status_code < 500, resp.text[:300]
        assert resp.status_code == 200 or resp.status_code in (400, 413, 415), resp.text[:300]
        assert resp.headers.get("x-request-id")
        if resp.status_code != 200:
            answer = msgspec.json.decode(resp.content)
            assert set(answer) == {"error", "request_id"}
            assert set(answer["error"]) == {"code", "message", "field"}
            assert answer["request_id"] == resp.headers["x-request-id"]

    post()
    assert worker_pids() == pids, "a worker was restarted"
    assert sum(seen.values()) >= HTTP_EXAMPLES // 2
    assert not sum(v for s, v in seen.items() if s >= 500), seen
    assert seen[200] and sum(v for s, v in seen.items() if s != 200)  # both kinds were hit
    with capsys.disabled():
        print(
            f"\n/rank fuzz: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))},"
            f" 5xx 0, restarts 0"
        )
