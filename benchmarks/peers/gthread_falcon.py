"""Peer: the plain synchronous baseline. gunicorn gthread + Falcon WSGI + one session.

    .venv-peers/bin/gunicorn --worker-class gthread --workers 2 --threads 4 \
        --chdir benchmarks/peers gthread_falcon:app

Each worker process loads ONE ONNX Runtime session per model at import (gunicorn does
not preload, so that happens after fork) and shares it between its threads (ORT
sessions are thread-safe and release the GIL while they run). Bodies are decoded with
msgspec into dicts, the same decoder family as the farm, so this baseline isolates the
serving architecture (threads vs. an event loop with an executor, no nginx) rather
than JSON speed; the id matrix is built by the same loop as the naive peer.
"""

from __future__ import annotations

import os

import falcon
import msgspec
import peer_common

models = peer_common.Models()
peer_common.mark_ready()
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def read_json(req: falcon.Request) -> dict:
    try:
        return _decode(req.bounded_stream.read())
    except msgspec.DecodeError:
        raise falcon.HTTPBadRequest(description="body is not JSON") from None


def write_json(resp: falcon.Response, value: dict) -> None:
    resp.data = _encode(value)
    resp.content_type = falcon.MEDIA_JSON


class Ready:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        write_json(resp, {"ready": True, "pid": os.getpid()})


class Predict:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            ids = models.predict_ids(read_json(req))
        except peer_common.BadRequest as exc:
            raise falcon.HTTPBadRequest(description=str(exc)) from None
        write_json(resp, {"ctr": models.autoint.run(ids).tolist()})


class Rank:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            args = models.rank_args(read_json(req))
        except peer_common.BadRequest as exc:
            raise falcon.HTTPBadRequest(description=str(exc)) from None
        write_json(resp, {"rankings": models.rank(*args)})


app = falcon.App()
app.add_route("/ready", Ready())
app.add_route("/predict", Predict())
app.add_route("/rank", Rank())
