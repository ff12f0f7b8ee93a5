"""Candidates (objects, rows or columns; JSON or msgpack) -> int64 id matrix, with OOV mapping.

The three accepted forms of ``candidates``, for fields ``f1..fk`` in card order::

    objects:  [{"f1": 3, "f2": 7, ...}, ...]        (the reference API's form)
    rows:     [[3, 7, ...], ...]                   (ids in card field order)
    columns:  {"f1": [3, ...], "f2": [7, ...], ...}  (cheapest to decode)

The form is told from the first bytes of the raw value, then a decoder built once per
(form, content type) at start-up decodes it straight into typed Python values, which
become one C-contiguous ``int64`` matrix ``[n, k]``. Ids outside ``[0, vocab_size)``
map to the field's OOV index and are counted.

A key repeated inside a candidate object or the columns object is rejected (msgspec would
keep the last value silently, msgspec#648), where an exact check is cheap: JSON objects
and columns, msgpack columns and single candidates. A msgpack candidate object with a
repeated key keeps its last value (no cheap exact check; see ``_reject_duplicate_keys``).
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import threading
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from app import metrics
from app.errors import InvalidRequest, MalformedBody
from app.schema import CardField

Form = Literal["objects", "rows", "columns"]
ContentKind = Literal["json", "msgpack"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Ids must fit int64; values outside the vocabulary are legal and map to OOV. The hot
#: decoders type ids as plain ``int`` (see ``FeatureSpace.decode``); ``Id``'s bound is
#: checked by the strict decoders, on the error path only.
Id = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
#: What packing a decoded int outside int64 into the matrix raises.
_PACK_ERRORS = (struct.error, OverflowError)

_JSON_WS = b" \t\r\n"
_PATH_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_COLON = ord(":")
#: Bodies up to this size count their ``:`` with ``bytes.count`` (one copy, no numpy).
_SMALL_BODY = 4096
#: What decoding untrusted bytes can raise: msgspec's own errors, plus two that msgspec
#: 0.22 lets through from Python: nesting deeper than the recursion limit (~1000 levels)
#: and invalid UTF-8 in an object key or string. Every one is the client's fault.
DECODE_ERRORS = (msgspec.MsgspecError, RecursionError, UnicodeDecodeError)


def error_from_msgspec(exc: Exception, prefix: str) -> InvalidRequest | MalformedBody:
    """Translate a decode error (one of ``DECODE_ERRORS``) into ours, re-rooting its path
    under ``prefix``."""
    if isinstance(exc, RecursionError):
        return MalformedBody("body is nested too deeply", field=prefix or None)
    if isinstance(exc, UnicodeDecodeError):
        return MalformedBody("body holds invalid UTF-8", field=prefix or None)
    match = _PATH_RE.match(str(exc))
    msg = match.group("msg") if match else str(exc)
    path = match.group("path") if match and match.group("path") is not None else ""
    field = (prefix + path).lstrip(".") or None
    if isinstance(exc, msgspec.ValidationError):
        return InvalidRequest(msg, field=field)
    return MalformedBody(msg, field=field)


class OOVCounter:
    """Count of ids mapped to the OOV bucket, by field (thread-safe): this process's in
    :meth:`snapshot`, the farm's in ``ctr_farm_oov_ids_total``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._counts = np.zeros(len(names), dtype=np.int64)
        self._lock = threading.Lock()

    def add(self, per_field: np.ndarray) -> None:
        with self._lock:
            self._counts += per_field
        for i in np.flatnonzero(per_field):
            metrics.oov_child(self.names[i]).inc(int(per_field[i]))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(zip(self.names, self._counts.tolist(), strict=True))


class FeatureSpace:
    """Decodes candidates for one field layout (a model card's ``fields``)."""

    def __init__(self, fields: Sequence[CardField], max_candidates: int) -> None:
        self.names = tuple(f.name for f in fields)
        self.width = len(self.names)
        self.max_candidates = max_candidates
        self._vocab = np.array([f.vocab_size for f in fields], dtype=np.int64)
        self._oov = np.array([f.oov_index for f in fields], dtype=np.int64)
        self.oov_counter = OOVCounter(self.names)
        for name in self.names:  # exported from 0, before the first OOV id
            metrics.oov_child(name)

        self._row = struct.Struct(f"={self.width}q")  # one candidate -> 8 * k bytes
        # PERF: two decoder sets. The hot one types ids as plain ``int``: the ``Id`` bound
        # costs ~25% of an objects decode (0.59 -> 0.47 ms per 1000 x 16 JSON). An int
        # outside int64 then decodes (msgspec takes JSON ints of any size, msgpack up to
        # uint64) and fails the int64 packing in ``to_matrix``; any failure of the hot
        # decoder or of the packing re-decodes with the strict set (``Id``), which raises
        # exactly the error and path the strict decode always raised.
        self._decoders = self._build_decoders(int, max_candidates)
        self._strict = self._build_decoders(Id, max_candidates)

    def _build_decoders(self, id_type: Any, max_candidates: int) -> dict[Any, Any]:
        bounded = msgspec.Meta(min_length=1, max_length=max_candidates)
        obj = msgspec.defstruct(
            "Candidate", [(n, id_type) for n in self.names], forbid_unknown_fields=True, gc=False
        )
        row = tuple.__class_getitem__((id_type,) * self.width)  # fixed length: msgspec checks
        cols = msgspec.defstruct(
            "CandidateColumns",
            [(n, Annotated[list[id_type], bounded]) for n in self.names],
            forbid_unknown_fields=True,
        )
        types: dict[Form, Any] = {
            "objects": Annotated[list[obj], bounded],
            "rows": Annotated[list[row], bounded],
            "columns": cols,
        }
        decoders: dict[Any, Any] = {}
        for form, typ in types.items():
            decoders["json", form] = msgspec.json.Decoder(typ)
            decoders["msgpack", form] = msgspec.msgpack.Decoder(typ)
        decoders["json", "single"] = msgspec.json.Decoder(obj)
        decoders["msgpack", "single"] = msgspec.msgpack.Decoder(obj)
        return decoders

    # -- decoding ------------------------------------------------------------------------
    def decode(self, raw: bytes | msgspec.Raw, kind: ContentKind, path: str = "candidates"):
        """Raw ``candidates`` value -> (ids matrix [n, k] int64 with OOV mapped, form)."""
        # 4 KiB covers any sane amount of whitespace before the first element.
        form = detect_form(bytes(memoryview(raw)[:4096]), kind)
        if form is None:
            raise InvalidRequest(
                "Expected an array of candidates (objects or rows) or an object of columns",
                field=path,
            )
        if form == "empty":
            raise InvalidRequest("Expected at least one candidate", field=path)
        try:
            value = self._decoders[kind, form].decode(raw)
            ids = self._pack(value, form)
        except (*DECODE_ERRORS, *_PACK_ERRORS) as exc:
            raise self._strict_error(raw, kind, form, path) from exc
        if form != "rows":
            n = len(value) if form == "objects" else 1
            self._reject_duplicate_keys(raw, kind, form, n, path)
        return self._finish(ids, value, form, path), form

    def decode_one(self, raw: bytes | msgspec.Raw, kind: ContentKind, path: str = "candidate"):
        try:
            value = self._decoders[kind, "single"].decode(raw)
            ids = self._pack([value], "objects")
        except (*DECODE_ERRORS, *_PACK_ERRORS) as exc:
            raise self._strict_error(raw, kind, "single", path) from exc
        self._reject_duplicate_keys(raw, kind, "single", 1, path)
        return self._finish(ids, [value], "objects", path)

    def _strict_error(
        self, raw: bytes | msgspec.Raw, kind: ContentKind, form: str, path: str
    ) -> InvalidRequest | MalformedBody:
        """Error path only: the error the strict decoder (ids bounded to int64) raises."""
        try:
            self._strict[kind, form].decode(raw)
        except DECODE_ERRORS as exc:
            return error_from_msgspec(exc, path)
        # The hot decode or packing failed on what the strict decoder accepts: not expected
        # (both take the same types); still the client's body, never a 500.
        return InvalidRequest("Ids must be integers within int64", field=path)

    def _reject_duplicate_keys(
        self, raw: bytes | msgspec.Raw, kind: ContentKind, form: str, n: int, path: str
    ) -> None:
        """Reject a repeated key in successfully decoded candidate objects or columns.

        After the decode every key is a field name (an identifier: ``defstruct`` needs
        one) and every value an int or a list of ints, so a JSON body holds exactly one
        ``:`` per key, and a msgpack map states its entry count in its header: a
        surplus is a repeat.
        PERF: counting ``:`` with numpy costs ~20 us per 1000 objects of 16 fields
        (~2% of their decode; an interleaved A/B of the decode moved +3%, inside its
        A/A noise of up to 5%). A msgpack list of objects would need a Python walk over
        every map header, so it is not checked: its last value wins.
        """
        if kind == "json" and len(raw) <= _SMALL_BODY:
            pairs = bytes(raw).count(b":")  # PERF: 0.1 us for one candidate; numpy's is 2 us
        elif kind == "json":
            pairs = int(np.count_nonzero(np.frombuffer(raw, dtype=np.uint8) == _COLON))
        elif form == "objects":
            return
        else:
            pairs = _msgpack_map_len(bytes(memoryview(raw)[:5]))
        expected = n * self.width if form == "objects" else self.width
        if pairs != expected:
            try:  # an id beyond int64 before the repeat is what the strict decode named
                self._strict[kind, form].decode(raw)
            except DECODE_ERRORS as exc:
                raise error_from_msgspec(exc, path) from exc
            field = _first_repeated_key(raw, form, path) if kind == "json" else path
            raise InvalidRequest("Object contains a repeated key", field=field)

    def to_matrix(self, value: Any, form: Form, path: str) -> np.ndarray:
        """Decoded candidates (any form) -> the id matrix [n, k], OOV mapped. Raises
        ``struct.error`` / ``OverflowError`` for an id outside int64."""
        return self._finish(self._pack(value, form), value, form, path)

    def _pack(self, value: Any, form: Form) -> bytearray:
        """The ids as native int64 bytes, row-major for objects and rows, column-major for
        columns (struct fails on any id outside int64).
        PERF (1000 x 16, best of 5 x 300): objects 0.21 ms vs 0.42 for
        ``np.fromiter(chain(astuple))``; rows 0.16 vs 0.53 for ``np.array(list_of_tuples)``;
        columns 0.14 vs 0.46 for ``np.array(columns).T``. ``bytearray.join`` keeps the
        buffer writable for ``map_oov`` without a copy."""
        if form == "objects":
            astuple = msgspec.structs.astuple
            return bytearray().join(itertools.starmap(self._row.pack, map(astuple, value)))
        if form == "rows":
            return bytearray().join(itertools.starmap(self._row.pack, value))
        # Unequal lengths are reported by _finish, after the repeated keys; packed all the
        # same, so that an id outside int64 is reported first, as the strict decode did.
        return bytearray().join(
            struct.pack(f"={len(c)}q", *c) for c in msgspec.structs.astuple(value)
        )

    def _finish(self, packed: bytearray, value: Any, form: Form, path: str) -> np.ndarray:
        flat = np.frombuffer(packed, dtype=np.int64)
        if form != "columns":
            return self.map_oov(flat.reshape(len(value), self.width))
        columns = msgspec.structs.astuple(value)
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            longest = max(range(self.width), key=lambda i: len(columns[i]))
            raise InvalidRequest(
                f"All columns must have the same length; got lengths {sorted(lengths)}",
                field=f"{path}.{self.names[longest]}",
            )
        return self.map_oov(np.ascontiguousarray(flat.reshape(self.width, -1).T))

    def map_oov(self, ids: np.ndarray) -> np.ndarray:
        """Map out-of-vocabulary and negative ids to each field's OOV index, in place."""
        bad = (ids < 0) | (ids >= self._vocab)
        if bad.any():
            self.oov_counter.add(bad.sum(axis=0))
            np.copyto(ids, np.broadcast_to(self._oov, ids.shape), where=bad)
        return ids


class _Repeated(Exception):
    def __init__(self, index: int, key: str) -> None:
        self.index, self.key = index, key


def _first_repeated_key(raw: bytes | msgspec.Raw, form: str, path: str) -> str:
    """Error path only: the path of the first repeated key, found by the stdlib parser
    (its ``object_pairs_hook`` sees every pair). The body already decoded, so it holds
    at most ``max_candidates`` objects of int values."""
    index = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        nonlocal index
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(index, key)
            seen.add(key)
        index += 1
        return {}

    try:
        json.loads(bytes(raw), object_pairs_hook=hook)
    except _Repeated as rep:
        return f"{path}[{rep.index}].{rep.key}" if form == "objects" else f"{path}.{rep.key}"
    except ValueError:  # what msgspec accepted, the stdlib should too; never a 500 for it
        pass
    return path


def _msgpack_map_len(head: bytes) -> int:
    """The entry count of the msgpack map starting ``head`` (-1 if it is no map)."""
    b = head[0] if head else 0
    if 0x80 <= b <= 0x8F:
        return b & 0x0F
    if b == 0xDE and len(head) >= 3:
        return int.from_bytes(head[1:3], "big")
    if b == 0xDF and len(head) >= 5:
        return int.from_bytes(head[1:5], "big")
    return -1


def detect_form(head: bytes, kind: ContentKind) -> Form | Literal["empty"] | None:
    """Tell the candidate form from the first bytes of its encoded value."""
    if kind == "json":
        head = head.lstrip(_JSON_WS)
        if not head:
            return None
        if head[:1] == b"{":
            return "columns"
        if head[:1] != b"[":
            return None
        rest = head[1:].lstrip(_JSON_WS)
        if rest[:1] == b"]":
            return "empty"
        # An array whose first element we cannot see (over 4 KiB of whitespace) is
        # decoded as objects; msgspec then reports the precise type error.
        return "rows" if rest[:1] == b"[" else "objects"
    return _detect_msgpack(head)


def _detect_msgpack(head: bytes) -> Form | Literal["empty"] | None:
    if not head:
        return None
    b = head[0]
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        return "columns"
    if 0x90 <= b <= 0x9F:
        n, rest = b & 0x0F, head[1:]
    elif b == 0xDC and len(head) >= 3:
        n, rest = int.from_bytes(head[1:3], "big"), head[3:]
    elif b == 0xDD and len(head) >= 5:
        n, rest = int.from_bytes(head[1:5], "big"), head[5:]
    else:
        return None
    if n == 0:
        return "empty"
    first = rest[0] if rest else 0
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        return "rows"
    return "objects"
