"""Peer: LitServe, a batching-capable Python serving framework, with batching ON.

    .venv-peers/bin/python benchmarks/peers/litserve_batched.py --port 8000 --workers 2

LitServe's architecture: ``--workers`` API server processes (uvicorn + FastAPI, its
default of one per inference worker) parse the JSON and pass the payload over a queue
to ``--workers`` inference worker processes per endpoint, which collect up to
``max_batch_size`` requests (waiting at most ``batch_timeout``), decode them, run ONE
ONNX Runtime call per model per batch and answer each request.

- ``/predict``: the batch's candidates are concatenated into one AutoInt run.
- ``/rank``: one DeepFM run over every request's candidates, a per-request cut to
  ``stage1_k``, one AutoInt run over every request's survivors, a per-request
  ``top_k``. Rows do not interact in either model, so the answer equals ranking alone.

``--endpoints`` serves a subset: the comparison harness starts one endpoint at a time
so idle inference workers (LitServe's batch collector polls its queue every
millisecond) do not take CPU from the measured ones. ``fast_queue`` (ZeroMQ) is on, as
LitServe's docs advise above 100 requests per second.
"""

from __future__ import annotations

import argparse
import signal

import litserve as ls
import numpy as np
import peer_common
from fastapi import HTTPException


def _decoded(fn, body):
    try:
        return fn(body)
    except peer_common.BadRequest as exc:
        # LitServe answers every request of a batch with an error raised inside it.
        raise HTTPException(400, str(exc)) from None


class PredictAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.models = peer_common.Models()
        peer_common.mark_ready()

    def decode_request(self, request: dict) -> np.ndarray:
        return _decoded(self.models.predict_ids, request)

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        scores = self.models.autoint.run(np.concatenate(inputs))
        return np.split(scores, np.cumsum([len(x) for x in inputs])[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray) -> dict:
        return {"ctr": output.tolist()}


class RankAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.models = peer_common.Models()
        peer_common.mark_ready()

    def decode_request(self, request: dict) -> tuple:
        return _decoded(self.models.rank_args, request)

    def batch(self, inputs: list[tuple]) -> list[tuple]:
        return inputs

    def predict(self, inputs: list[tuple]) -> list[list[dict]]:
        return self.models.rank_batch(inputs)

    def unbatch(self, output: list[list[dict]]) -> list[list[dict]]:
        return output

    def encode_response(self, output: list[dict]) -> dict:
        return {"rankings": output}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # LitServe shuts down gracefully on KeyboardInterrupt only: make SIGTERM one too, and
    # SIGINT one even when a non-interactive shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2, help="inference workers per endpoint")
    p.add_argument("--endpoints", default="predict,rank")
    p.add_argument("--predict-batch", type=int, default=16, help="max_batch_size of /predict")
    p.add_argument("--rank-batch", type=int, default=4, help="max_batch_size of /rank")
    p.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    p.add_argument("--fast-queue", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    apis = []
    endpoints = args.endpoints.split(",")
    if "predict" in endpoints:
        apis.append(
            PredictAPI(
                max_batch_size=args.predict_batch,
                batch_timeout=args.batch_timeout,
                api_path="/predict",
            )
        )
    if "rank" in endpoints:
        apis.append(
            RankAPI(
                max_batch_size=args.rank_batch, batch_timeout=args.batch_timeout, api_path="/rank"
            )
        )
    server = ls.LitServer(
        apis,
        accelerator="cpu",
        workers_per_device=args.workers,
        healthcheck_path="/ready",
        fast_queue=args.fast_queue,
        disable_openapi_url=True,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.workers,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
