"""Peer: the naive stack a typical user writes. FastAPI + uvicorn, stdlib ``json``.

    .venv-peers/bin/uvicorn fastapi_naive:app --app-dir benchmarks/peers --workers 2

``async def`` handlers read the body, ``json.loads`` it into dicts, build the id matrix
with a Python loop, and call ONE shared ONNX Runtime session per model per process
inline (on the event loop, as most examples do). Responses are plain dicts that
FastAPI serializes. uvicorn picks uvloop + httptools (installed with litserve's
``uvicorn[standard]``), like the farm's uvicorn workers.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager

import peer_common
from fastapi import FastAPI, HTTPException, Request

models: peer_common.Models | None = None


@asynccontextmanager
async def lifespan(_: FastAPI):
    global models
    models = peer_common.Models()
    peer_common.mark_ready()
    yield


app = FastAPI(lifespan=lifespan)


async def read_json(request: Request) -> dict:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise HTTPException(400, "body is not JSON") from None


@app.get("/ready")
async def ready() -> dict:
    return {"ready": models is not None, "pid": os.getpid()}


@app.post("/predict")
async def predict(request: Request) -> dict:
    body = await read_json(request)
    try:
        ids = models.predict_ids(body)
    except peer_common.BadRequest as exc:
        raise HTTPException(400, str(exc)) from None
    return {"ctr": models.autoint.run(ids).tolist()}


@app.post("/rank")
async def rank(request: Request) -> dict:
    body = await read_json(request)
    try:
        ids, top_k, stage1_k, multi_stage = models.rank_args(body)
    except peer_common.BadRequest as exc:
        raise HTTPException(400, str(exc)) from None
    return {"rankings": models.rank(ids, top_k, stage1_k, multi_stage)}
