"""The bad-input corpus of fault suite item 1 (issue 6), as data.

Each :class:`Case` is one malformed request: its name, content type, body (bytes or a
builder over a :class:`Kit`), the paths it is sent to, and the documented answer (status,
``error.code``, ``error.field``; README "Errors" and "Limits"). Every case is a 4xx:
none may answer 5xx.

:data:`CONTROLS` are documented non-errors next to the corpus (out-of-vocabulary ids map
to the OOV bucket; a repeated top-level key or a repeated key in a msgpack candidate
object keeps its last value): 200s, pinned so a change of behaviour is noticed.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from app.config import Config

JSON = "application/json"
MSGPACK = "application/msgpack"
RANK, PREDICT = "/rank", "/predict"
BOTH = (RANK, PREDICT)
INT64_MAX = 2**63 - 1
DEEP = 10_000


@dataclass(frozen=True)
class Kit:
    """What the builders need: field names, one valid candidate, the limits."""

    names: list[str]
    obj: dict[str, int]
    row: list[int]
    config: Config

    def rank(self, **fields: Any) -> bytes:
        """A JSON /rank body of one object candidate plus ``fields``."""
        return msgspec.json.encode({"candidates": [self.obj], **fields})

    def rank_mp(self, **fields: Any) -> bytes:
        return msgspec.msgpack.encode({"candidates": [self.row], **fields})

    def with_id(self, value: Any, kind: str = "json") -> bytes:
        """One object candidate whose second field is ``value``."""
        body = {"candidates": [{**self.obj, self.names[1]: value}]}
        return msgspec.json.encode(body) if kind == "json" else msgspec.msgpack.encode(body)

    def raw_last_id(self, literal: bytes) -> bytes:
        """One JSON row whose last id is the text ``literal`` (NaN, huge ints...)."""
        head = b",".join(str(v).encode() for v in self.row[:-1])
        return b'{"candidates": [[' + head + b"," + literal + b"]]}"

    def obj_text(self) -> bytes:
        """The JSON text of the valid candidate object without its closing brace."""
        return msgspec.json.encode(self.obj)[:-1]

    def rows_text(self, n: int) -> bytes:
        """A JSON /rank body of ``n`` rows, built as bytes (1M rows would not fit lists)."""
        row = msgspec.json.encode(self.row)
        return b'{"candidates": [' + b",".join([row] * n) + b"]}"

    def padded(self, size: int) -> bytes:
        """A syntactically valid JSON body of exactly ``size`` bytes."""
        head, tail = b'{"candidates": [', b"]}"
        return head + b" " * (size - len(head) - len(tail)) + tail


Field = str | None | Callable[[Kit], str | None]
Body = bytes | Callable[[Kit], bytes]


@dataclass(frozen=True)
class Case:
    name: str
    body: Body
    status: int
    code: str
    #: Expected ``error.field``: a string (``{n[i]}`` is the i-th field name, ``{last}``
    #: the last index), None, or ``...`` for "do not check".
    field: Any = None
    content_type: str | None = JSON
    paths: tuple[str, ...] = (RANK,)

    def build(self, kit: Kit) -> bytes:
        return self.body(kit) if callable(self.body) else self.body

    def want_field(self, kit: Kit) -> Any:
        if isinstance(self.field, str):
            return self.field.format(n=kit.names, last=len(kit.names) - 1)
        return self.field


def mp(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def js(value: Any) -> bytes:
    return msgspec.json.encode(value)


def mp_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map with exactly these pairs, repeats kept (map16 header)."""
    return b"\xde" + len(pairs).to_bytes(2, "big") + b"".join(mp(k) + mp(v) for k, v in pairs)


def columns(k: Kit, n: int = 1) -> dict[str, list[int]]:
    return {name: [k.obj[name]] * n for name in k.names}


def lookalike(name: str) -> str:
    """``name`` with its first ``e``/``a``/``o`` swapped for the Cyrillic look-alike."""
    for latin, cyrillic in (("e", "\u0435"), ("a", "\u0430"), ("o", "\u043e")):
        if latin in name:
            return name.replace(latin, cyrillic, 1)
    return name + "\u200d"


def too_deep(k: Kit) -> bytes:
    return b'{"candidates": ' + b"[" * DEEP + b"]" * DEEP + b"}"


def too_deep_objects(k: Kit) -> bytes:
    return b'{"candidates": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}"


def deep_unknown_field(k: Kit) -> bytes:
    return k.rank()[:-1] + b', "x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}"


def too_deep_mp(k: Kit) -> bytes:
    return b"\x81\xaacandidates" + b"\x91" * DEEP + b"\x90"


CASES: list[Case] = [
    # -- not JSON / not msgpack: malformed_body ------------------------------------------------
    Case("json-truncated", b'{"candidates": [', 400, "malformed_body", paths=BOTH),
    Case("json-not-json", b"hello world", 400, "malformed_body", paths=BOTH),
    Case("json-trailing-garbage", lambda k: k.rank() + b"}", 400, "malformed_body"),
    Case("json-single-quotes", b"{'candidates': [[1]]}", 400, "malformed_body", paths=BOTH),
    Case("json-trailing-comma", lambda k: k.rank()[:-2] + b",]}", 400, "malformed_body"),
    Case("json-comment", lambda k: k.rank()[:-1] + b" /* hi */}", 400, "malformed_body"),
    Case("json-utf8-bom", lambda k: b"\xef\xbb\xbf" + k.rank(), 400, "malformed_body"),
    Case("json-nul-byte", lambda k: k.rank() + b"\x00", 400, "malformed_body", paths=BOTH),
    Case("empty-body", b"", 400, "malformed_body", paths=BOTH),
    Case("whitespace-body", b" \r\n\t ", 400, "malformed_body", paths=BOTH),
    Case(
        "json-charset-utf16",
        lambda k: k.rank().decode().encode("utf-16"),
        400,
        "malformed_body",
        content_type="application/json; charset=utf-16",
    ),
    Case("msgpack-garbage", b"\xc1\xff\x00garbage", 400, "malformed_body", None, MSGPACK, BOTH),
    Case("msgpack-truncated", lambda k: k.rank_mp()[:-3], 400, "malformed_body", None, MSGPACK),
    Case(
        "msgpack-trailing-bytes",
        lambda k: k.rank_mp() + b"\x01",
        400,
        "malformed_body",
        None,
        MSGPACK,
    ),
    Case(
        "msgpack-array32-claims-4g",
        b"\x81\xaacandidates\xdd\xff\xff\xff\xff\x01",
        400,
        "malformed_body",
        None,
        MSGPACK,
    ),
    Case("msgpack-sent-as-json", lambda k: k.rank_mp(), 400, "malformed_body"),
    # msgspec reads the "{" as the msgpack int 123 and reports the type, not the tail.
    Case("json-sent-as-msgpack", lambda k: k.rank(), 400, "invalid_request", None, MSGPACK),
    # -- invalid UTF-8 and unicode ------------------------------------------------------------
    Case(
        "utf8-invalid-in-candidate-key",
        lambda k: b'{"candidates": [{"\xff\xfe": 1}]}',
        400,
        "malformed_body",
        "candidates",
    ),
    Case(
        "utf8-invalid-in-msgpack-candidate-key",
        lambda k: b"\x81\xaacandidates\x91\x81\xa2\xff\xfe\x01",
        400,
        "malformed_body",
        "candidates",
        MSGPACK,
    ),
    Case(
        "utf8-invalid-top-level-key",
        lambda k: k.rank()[:-1] + b', "\xff\xfe": 1}',
        400,
        "malformed_body",
        None,
    ),
    Case(
        "utf8-invalid-msgpack-top-level-key",
        lambda k: b"\x82\xaacandidates\x91" + mp(k.row) + b"\xa2\xff\xfe\x01",
        400,
        "malformed_body",
        None,
        MSGPACK,
    ),
    Case(
        "utf8-invalid-predict-model",
        lambda k: b'{"candidate": ' + js(k.obj) + b', "model": "\xc3\x28"}',
        400,
        "malformed_body",
        None,
        paths=(PREDICT,),
    ),
    Case(
        "lone-surrogate-escape-key",
        lambda k: k.rank()[:-1] + b', "\\udc00x": 1}',
        400,
        "malformed_body",
    ),
    Case(
        "unicode-lookalike-field-name",
        lambda k: js({"candidates": [{lookalike(n): v for n, v in k.obj.items()}]}),
        400,
        "invalid_request",
        "candidates[0]",
    ),
    Case(
        "unicode-extra-field-name",
        lambda k: js({"candidates": [{**k.obj, "r\u00e9gion\u200d": 1}]}),
        400,
        "invalid_request",
        "candidates[0]",
    ),
    Case(
        "unicode-emoji-column",
        lambda k: js({"candidates": {**columns(k), "\U0001f525": [1]}}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case(
        "unicode-top-level-key",
        lambda k: js({"c\u00e4ndidates": [k.obj], "candidates": [k.obj]}),
        400,
        "invalid_request",
        None,
    ),
    Case(
        "unicode-msgpack-field-name",
        lambda k: mp({"candidates": [{**k.obj, "\u0444\u0438\u043b\u044c\u043c": 1}]}),
        400,
        "invalid_request",
        "candidates[0]",
        MSGPACK,
    ),
    # -- NaN / Infinity ----------------------------------------------------------------------
    Case("nan-literal-id", lambda k: k.raw_last_id(b"NaN"), 400, "malformed_body"),
    Case("infinity-literal-id", lambda k: k.raw_last_id(b"Infinity"), 400, "malformed_body"),
    Case("minus-infinity-id", lambda k: k.raw_last_id(b"-Infinity"), 400, "malformed_body"),
    Case("nan-top_k", lambda k: k.rank()[:-1] + b', "top_k": NaN}', 400, "malformed_body"),
    Case(
        "json-1e400-top_k",
        lambda k: k.rank()[:-1] + b', "top_k": 1e400}',
        400,
        "invalid_request",
        "top_k",
    ),
    Case(
        "msgpack-nan-id",
        lambda k: mp({"candidates": [[*k.row[:-1], float("nan")]]}),
        400,
        "invalid_request",
        "candidates[0][{last}]",
        MSGPACK,
    ),
    Case(
        "msgpack-inf-top_k",
        lambda k: k.rank_mp(top_k=float("inf")),
        400,
        "invalid_request",
        "top_k",
        MSGPACK,
    ),
    # -- wrong types -------------------------------------------------------------------------
    *[
        Case(
            f"id-{label}",
            (lambda v: lambda k: k.with_id(v))(value),
            400,
            "invalid_request",
            "candidates[0].{n[1]}",
            paths=BOTH,
        )
        for label, value in [
            ("string", "3"),
            ("bool", True),
            ("null", None),
            ("list", [1]),
            ("object", {"id": 1}),
            ("float-1.5", 1.5),
            ("float-1.0", 1.0),
        ]
    ],
    Case(
        "id-exponent-1e3",
        lambda k: k.raw_last_id(b"1e3"),
        400,
        "invalid_request",
        "candidates[0][{last}]",
    ),
    Case(
        "id-string-msgpack",
        lambda k: k.with_id("3", "msgpack"),
        400,
        "invalid_request",
        "candidates[0].{n[1]}",
        MSGPACK,
    ),
    Case(
        "id-float-msgpack",
        lambda k: mp({"candidates": [[*k.row[:-1], 2.5]]}),
        400,
        "invalid_request",
        "candidates[0][{last}]",
        MSGPACK,
    ),
    Case("top_k-string", lambda k: k.rank(top_k="3"), 400, "invalid_request", "top_k"),
    Case("top_k-float", lambda k: k.rank(top_k=3.0), 400, "invalid_request", "top_k"),
    Case("top_k-bool", lambda k: k.rank(top_k=True), 400, "invalid_request", "top_k"),
    Case("stage1_k-list", lambda k: k.rank(stage1_k=[5]), 400, "invalid_request", "stage1_k"),
    *[
        Case(
            f"multi_stage-{label}",
            (lambda v: lambda k: k.rank(multi_stage=v))(value),
            400,
            "invalid_request",
            "multi_stage",
        )
        for label, value in [("string", "yes"), ("int", 1), ("null", None)]
    ],
    *[
        Case(
            f"candidates-{label}",
            (lambda v: lambda k: js({"candidates": v}))(value),
            400,
            "invalid_request",
            "candidates",
            paths=BOTH,
        )
        for label, value in [("int", 5), ("string", "abc"), ("null", None), ("bool", True)]
    ],
    Case("body-is-array", lambda k: js([k.row]), 400, "invalid_request", None, paths=BOTH),
    Case("body-is-null", b"null", 400, "invalid_request", None, paths=BOTH),
    # -- msgpack types and extensions ---------------------------------------------------------
    Case(
        "msgpack-ext-id",
        lambda k: mp({"candidates": [[*k.row[:-1], msgspec.msgpack.Ext(7, b"\x01")]]}),
        400,
        "invalid_request",
        "candidates[0][{last}]",
        MSGPACK,
    ),
    Case(
        "msgpack-ext-candidates",
        lambda k: mp({"candidates": msgspec.msgpack.Ext(7, b"abc")}),
        400,
        "invalid_request",
        "candidates",
        MSGPACK,
    ),
    Case(
        "msgpack-ext-body",
        mp(msgspec.msgpack.Ext(7, b"abc")),
        400,
        "invalid_request",
        None,
        MSGPACK,
        BOTH,
    ),
    Case(
        "msgpack-timestamp-top_k",
        lambda k: k.rank_mp(top_k=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)),
        400,
        "invalid_request",
        "top_k",
        MSGPACK,
    ),
    Case(
        "msgpack-bin-key",
        lambda k: b"\x81\xc4\x0acandidates\x91" + mp(k.row),
        400,
        "invalid_request",
        ...,
        MSGPACK,
    ),
    Case("msgpack-int-key", b"\x81\x01\x91\x01", 400, "invalid_request", ..., MSGPACK),
    # -- ids beyond int64 ----------------------------------------------------------------------
    Case(
        "id-int64-max-plus-1",
        lambda k: k.raw_last_id(str(INT64_MAX + 1).encode()),
        400,
        "invalid_request",
        "candidates[0][{last}]",
    ),
    Case(
        "id-int64-min-minus-1",
        lambda k: k.raw_last_id(str(-INT64_MAX - 2).encode()),
        400,
        "invalid_request",
        "candidates[0][{last}]",
    ),
    Case(
        "id-40-digits",
        lambda k: k.raw_last_id(b"1" + b"0" * 40),
        400,
        "invalid_request",
        "candidates[0][{last}]",
    ),
    Case(
        "id-uint64-max-msgpack",
        lambda k: mp({"candidates": [[*k.row[:-1], 2**64 - 1]]}),
        400,
        "invalid_request",
        "candidates[0][{last}]",
        MSGPACK,
    ),
    # -- missing and extra fields ------------------------------------------------------------
    Case(
        "missing-field",
        lambda k: js({"candidates": [{n: 1 for n in k.names[:-1]}]}),
        400,
        "invalid_request",
        "candidates[0]",
        paths=BOTH,
    ),
    Case(
        "missing-column",
        lambda k: js({"candidates": {n: [1] for n in k.names[:-1]}}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case(
        "extra-field-in-candidate",
        lambda k: js({"candidates": [k.obj, {**k.obj, "zzz": 1}]}),
        400,
        "invalid_request",
        "candidates[1]",
        paths=BOTH,
    ),
    Case(
        "extra-column",
        lambda k: js({"candidates": {**columns(k), "zzz": [1]}}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case("extra-top-level-field", lambda k: k.rank(foo=1), 400, "invalid_request", None),
    Case("no-candidates", lambda k: js({"top_k": 3}), 400, "invalid_request", None),
    Case(
        "row-too-short",
        lambda k: js({"candidates": [k.row[:-1]]}),
        400,
        "invalid_request",
        "candidates[0]",
    ),
    Case(
        "row-too-long",
        lambda k: mp({"candidates": [k.row, [*k.row, 1]]}),
        400,
        "invalid_request",
        "candidates[1]",
        MSGPACK,
    ),
    Case(
        "ragged-columns",
        lambda k: js({"candidates": {**columns(k, 2), k.names[3]: [1, 2, 3]}}),
        400,
        "invalid_request",
        "candidates.{n[3]}",
    ),
    Case(
        "mixed-forms",
        lambda k: js({"candidates": [k.obj, k.row]}),
        400,
        "invalid_request",
        "candidates[1]",
    ),
    # -- repeated keys ------------------------------------------------------------------------
    Case(
        "duplicate-key-in-candidate",
        lambda k: b'{"candidates": [' + k.obj_text() + b', "%s": 1}]}' % k.names[2].encode(),
        400,
        "invalid_request",
        "candidates[0].{n[2]}",
        paths=BOTH,
    ),
    Case(
        "duplicate-column",
        lambda k: js({"candidates": columns(k)})[:-2] + b', "%s": [1]}}' % k.names[0].encode(),
        400,
        "invalid_request",
        "candidates.{n[0]}",
    ),
    Case(
        "duplicate-msgpack-column",
        lambda k: (
            b"\x81\xaacandidates"
            + mp_map([*((n, v) for n, v in columns(k).items()), (k.names[5], [1])])
        ),
        400,
        "invalid_request",
        "candidates",
        MSGPACK,
    ),
    Case(
        "duplicate-key-predict-candidate",
        lambda k: b'{"candidate": ' + k.obj_text() + b', "%s": 2}}' % k.names[4].encode(),
        400,
        "invalid_request",
        "candidate.{n[4]}",
        paths=(PREDICT,),
    ),
    # -- counts: empty, 10k, 1M, 50 MB ----------------------------------------------------------
    Case(
        "empty-list",
        lambda k: js({"candidates": []}),
        400,
        "invalid_request",
        "candidates",
        paths=BOTH,
    ),
    Case(
        "empty-list-msgpack",
        lambda k: mp({"candidates": []}),
        400,
        "invalid_request",
        "candidates",
        MSGPACK,
    ),
    Case(
        "empty-columns",
        lambda k: js({"candidates": {n: [] for n in k.names}}),
        400,
        "invalid_request",
        "candidates.{n[0]}",
    ),
    Case("empty-object", lambda k: js({"candidates": {}}), 400, "invalid_request", "candidates"),
    Case(
        "10k-candidates-rows", lambda k: k.rows_text(10_000), 400, "invalid_request", "candidates"
    ),
    Case(
        "10k-candidates-objects-msgpack",
        lambda k: mp({"candidates": [k.obj] * 10_000}),
        400,
        "invalid_request",
        "candidates",
        MSGPACK,
    ),
    Case(
        "10k-candidates-columns",
        lambda k: js({"candidates": columns(k, 10_000)}),
        400,
        "invalid_request",
        "candidates.{n[0]}",
    ),
    Case("1M-candidates", lambda k: k.rows_text(1_000_000), 413, "payload_too_large", None),
    Case(
        "50MB-body",
        lambda k: k.padded(50 * 1024 * 1024),
        413,
        "payload_too_large",
        None,
        paths=BOTH,
    ),
    Case(
        "body-limit-plus-1",
        lambda k: k.padded(k.config.max_body_bytes + 1),
        413,
        "payload_too_large",
        None,
    ),
    # -- deep nesting ------------------------------------------------------------------------
    Case(
        "nested-500-lists",
        lambda k: b'{"candidates": [' + b"[" * 500 + b"]" * 500 + b"]}",
        400,
        "invalid_request",
        "candidates[0][0]",
    ),
    Case("nested-10k-lists", too_deep, 400, "malformed_body", None),
    Case("nested-10k-objects", too_deep_objects, 400, "malformed_body", None),
    # forbid_unknown_fields stops at the key, before the nested value is read.
    Case("nested-10k-under-unknown-field", deep_unknown_field, 400, "invalid_request", None),
    Case(
        "nested-10k-msgpack-arrays",
        too_deep_mp,
        400,
        "malformed_body",
        None,
        MSGPACK,
    ),
    # -- top_k / stage1_k out of range ------------------------------------------------------------
    Case("top_k-zero", lambda k: k.rank(top_k=0), 400, "invalid_request", "top_k"),
    Case("top_k-negative", lambda k: k.rank(top_k=-3), 400, "invalid_request", "top_k"),
    Case(
        "top_k-gt-stage1_k", lambda k: k.rank(top_k=5, stage1_k=4), 400, "invalid_request", "top_k"
    ),
    Case(
        "top_k-gt-default-stage1_k",
        lambda k: k.rank(top_k=k.config.default_stage1_k + 1),
        400,
        "invalid_request",
        "top_k",
    ),
    Case("top_k-2pow70", lambda k: k.rank(top_k=2**70), 400, "invalid_request", "top_k"),
    Case(
        "stage1_k-zero", lambda k: k.rank(top_k=1, stage1_k=0), 400, "invalid_request", "stage1_k"
    ),
    Case("stage1_k-negative", lambda k: k.rank(stage1_k=-1), 400, "invalid_request", "stage1_k"),
    Case(
        "stage1_k-over-max_candidates",
        lambda k: k.rank(top_k=1, stage1_k=k.config.max_candidates + 1),
        400,
        "invalid_request",
        "stage1_k",
    ),
    Case(
        "stage1_k-int64-max",
        lambda k: k.rank(top_k=1, stage1_k=INT64_MAX),
        400,
        "invalid_request",
        "stage1_k",
    ),
    # -- content type --------------------------------------------------------------------------
    *[
        Case(
            f"content-type-{label}",
            (lambda k: k.rank()),
            415,
            "unsupported_media_type",
            "Content-Type",
            ctype,
            BOTH,
        )
        for label, ctype in [
            ("text-plain", "text/plain"),
            ("form-urlencoded", "application/x-www-form-urlencoded"),
            ("multipart", "multipart/form-data; boundary=xyz"),
            ("xml", "application/xml"),
            ("json-typo", "application/jsn"),
        ]
    ],
    # -- /predict specifics ----------------------------------------------------------------------
    Case(
        "predict-both-forms",
        lambda k: js({"candidate": k.obj, "candidates": [k.obj]}),
        400,
        "invalid_request",
        None,
        paths=(PREDICT,),
    ),
    Case("predict-nothing", b"{}", 400, "invalid_request", None, paths=(PREDICT,)),
    Case(
        "predict-too-many",
        lambda k: js({"candidates": [k.row] * (k.config.max_predict_candidates + 1)}),
        400,
        "invalid_request",
        "candidates",
        paths=(PREDICT,),
    ),
    Case(
        "predict-unknown-model",
        lambda k: js({"candidate": k.obj, "model": "nope"}),
        400,
        "invalid_request",
        "model",
        paths=(PREDICT,),
    ),
    Case(
        "predict-model-not-a-string",
        lambda k: js({"candidate": k.obj, "model": 7}),
        400,
        "invalid_request",
        "model",
        paths=(PREDICT,),
    ),
    Case(
        "predict-candidate-is-row",
        lambda k: js({"candidate": k.row}),
        400,
        "invalid_request",
        "candidate",
        paths=(PREDICT,),
    ),
    Case(
        "predict-rank-fields",
        lambda k: js({"candidate": k.obj, "top_k": 1}),
        400,
        "invalid_request",
        None,
        paths=(PREDICT,),
    ),
]


@dataclass(frozen=True)
class Control:
    """A documented non-error next to the corpus: 200, and the candidate count ranked."""

    name: str
    body: Callable[[Kit], bytes]
    #: ``stats.input`` of the answer (which duplicate won shows in the count).
    n_input: int
    content_type: str = JSON


CONTROLS: list[Control] = [
    Control("oov-negative-ids", lambda k: js({"candidates": [[-1] * len(k.row), k.row]}), 2),
    Control("oov-huge-in-int64", lambda k: js({"candidates": [[INT64_MAX] * len(k.row)]}), 1),
    Control(
        "oov-int64-min-msgpack", lambda k: mp({"candidates": [[-(2**63)] * len(k.row)]}), 1, MSGPACK
    ),
    # A repeated top-level key: the last one wins (msgspec; app/api.py decodes the body).
    Control(
        "duplicate-top-level-candidates",
        lambda k: b'{"candidates": [' + js(k.row) + b'], "candidates": ' + js([k.row] * 3) + b"}",
        3,
    ),
    # A repeated key in a msgpack candidate object: the last one wins (app/features.py).
    Control(
        "duplicate-key-msgpack-object",
        lambda k: (
            b"\x81\xaacandidates\x91" + mp_map([*k.obj.items(), (k.names[1], k.obj[k.names[1]])])
        ),
        1,
        MSGPACK,
    ),
]
