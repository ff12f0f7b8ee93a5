"""What every peer shares: the model cards, one ORT session per model, the cascade.

Runs inside ``.venv-peers`` (stdlib + numpy + onnxruntime only: never ``app``, whose
pinned env is the farm's). The peers import it as a top-level module: the harness puts
``benchmarks/peers`` on their ``sys.path``.

The cascade has the farm's semantics (``app/pipeline.py``): DeepFM scores all
candidates and keeps ``stage1_k`` by score descending, then request index ascending;
the survivors go on in index order; AutoInt re-scores them and keeps ``top_k``.
``multi_stage: false`` scores everything with AutoInt. ``top_k`` defaults to 10,
``stage1_k`` to 100; both clamp to the number of candidates.

Sessions use the farm's default threading (``intra_op`` = ``inter_op`` = 1, no
spinning) so that the comparison is of the serving stacks, not of ORT thread pools;
``PEER_INTRA_THREADS`` overrides the intra-op count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO_ROOT = Path(__file__).resolve().parents[2]


def newest_version(repo: Path) -> Path:
    """The version the farm serves by default: the highest-numbered dir with a card
    (``app.registry.newest``, restated here: the peers never import ``app``)."""
    found = [p for p in repo.iterdir() if p.name.isdigit() and (p / "card.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{repo}: no model version")
    return max(found, key=lambda p: int(p.name))


MODELS = {name: newest_version(REPO_ROOT / "models" / name) for name in ("deepfm", "autoint")}
PREDICT_MODEL = "autoint"
DEFAULT_TOP_K, DEFAULT_STAGE1_K = 10, 100
MAX_CANDIDATES, MAX_PREDICT_CANDIDATES = 5000, 64


class BadRequest(ValueError):
    """The request cannot be served (each peer turns it into its framework's 400)."""


class Model:
    """One model with ONE session, shared by every request (and thread) of the process."""

    def __init__(self, name: str) -> None:
        model_dir = Path(os.environ.get(f"PEER_{name.upper()}_MODEL", MODELS[name]))
        self.card = json.loads((model_dir / "card.json").read_text())
        self.name = name
        self.input = self.card["input"]["name"]
        self.output = self.card["output"]["name"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("PEER_INTRA_THREADS", "1"))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        return self.session.run([self.output], {self.input: ids})[0].reshape(-1)


class Models:
    """Both models of the cascade plus the field layout (card order) and OOV mapping."""

    def __init__(self) -> None:
        self.deepfm = Model("deepfm")
        self.autoint = Model("autoint")
        fields = self.autoint.card["fields"]
        self.names = [f["name"] for f in fields]
        self.vocab = np.array([f["vocab_size"] for f in fields], dtype=np.int64)
        self.oov = np.array([f["oov_index"] for f in fields], dtype=np.int64)

    # -- decoding: the naive way, a Python loop over dicts ----------------------------
    def matrix(self, candidates: list) -> np.ndarray:
        """Objects keyed by field name -> ``[n, 16]`` int64 ids (OOV mapped)."""
        if not isinstance(candidates, list) or not candidates:
            raise BadRequest("candidates must be a non-empty list")
        if len(candidates) > MAX_CANDIDATES:
            raise BadRequest(f"at most {MAX_CANDIDATES} candidates")
        rows = []
        for i, cand in enumerate(candidates):
            if not isinstance(cand, dict):
                raise BadRequest(f"candidates[{i}] must be an object")
            try:
                rows.append([int(cand[name]) for name in self.names])
            except (KeyError, TypeError, ValueError) as exc:
                raise BadRequest(f"candidates[{i}]: bad or missing field {exc}") from None
        try:
            ids = np.array(rows, dtype=np.int64)
        except OverflowError:
            raise BadRequest("ids must fit int64") from None
        return self.map_oov(ids)

    def map_oov(self, ids: np.ndarray) -> np.ndarray:
        bad = (ids < 0) | (ids >= self.vocab)
        return np.where(bad, self.oov, ids) if bad.any() else ids

    def predict_ids(self, body: dict) -> np.ndarray:
        """A ``/predict`` body (``candidate`` or ``candidates``) -> ids."""
        if not isinstance(body, dict) or ("candidate" in body) == ("candidates" in body):
            raise BadRequest("send exactly one of 'candidate' or 'candidates'")
        if "candidate" in body:
            return self.matrix([body["candidate"]])
        ids = self.matrix(body["candidates"])
        if len(ids) > MAX_PREDICT_CANDIDATES:
            raise BadRequest(f"at most {MAX_PREDICT_CANDIDATES} candidates per /predict")
        return ids

    def rank_args(self, body: dict) -> tuple[np.ndarray, int, int, bool]:
        """A ``/rank`` body -> (ids, top_k, stage1_k, multi_stage), ks validated and clamped."""
        if not isinstance(body, dict):
            raise BadRequest("body must be an object")
        ids = self.matrix(body.get("candidates"))
        top_k, stage1_k = body.get("top_k"), body.get("stage1_k")
        multi_stage = bool(body.get("multi_stage", True))
        for k in (top_k, stage1_k):
            if k is not None and (not isinstance(k, int) or k < 1):
                raise BadRequest("top_k and stage1_k must be positive integers")
        if top_k is None:  # as the farm: the default never exceeds an explicit stage1_k
            top_k = min(DEFAULT_TOP_K, stage1_k or DEFAULT_TOP_K)
        stage1_k = DEFAULT_STAGE1_K if stage1_k is None else stage1_k
        if not multi_stage:
            stage1_k = max(stage1_k, top_k)
        if top_k > stage1_k:
            raise BadRequest("top_k must not exceed stage1_k")
        n = len(ids)
        return ids, min(top_k, n), min(stage1_k, n), multi_stage

    # -- the cascade ----------------------------------------------------------------------
    def rank(self, ids: np.ndarray, top_k: int, stage1_k: int, multi_stage: bool) -> list[dict]:
        return self.rank_batch([(ids, top_k, stage1_k, multi_stage)])[0]

    def rank_batch(self, requests: list[tuple[np.ndarray, int, int, bool]]) -> list[list[dict]]:
        """Rank several requests with ONE DeepFM run and ONE AutoInt run (batching).

        Each request's rows keep their own positions, so the answer is the same as
        ranking it alone (rows do not interact inside either model).
        """
        cascaded = [i for i, r in enumerate(requests) if r[3]]
        # Stage 2 inputs per request: (request index, survivor positions, their ids).
        stage2: list[tuple[int, np.ndarray, np.ndarray]] = []
        if cascaded:
            scores = self.deepfm.run(_concat([requests[i][0] for i in cascaded]))
            start = 0
            for i in cascaded:
                ids, _, stage1_k, _ = requests[i]
                s = scores[start : start + len(ids)]
                start += len(ids)
                keep = np.sort(top(s, np.arange(len(ids)), stage1_k))
                stage2.append((i, keep, ids[keep]))
        stage2 += [(i, np.arange(len(r[0])), r[0]) for i, r in enumerate(requests) if not r[3]]
        stage2.sort(key=lambda t: t[0])
        scores = self.autoint.run(_concat([t[2] for t in stage2]))
        out: list[list[dict]] = []
        start = 0
        for i, alive, ids in stage2:
            s = scores[start : start + len(ids)]
            start += len(ids)
            best = top(s, alive, requests[i][1])
            out.append(rankings(alive[best], s[best]))
        return out


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.ascontiguousarray(np.concatenate(parts))


def top(scores: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Indices into ``scores`` of the ``k`` best by score desc, then position asc."""
    return np.lexsort((positions, -scores))[:k]


def rankings(indices: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [
        {"index": i, "ctr": c, "rank": r}
        for r, (i, c) in enumerate(zip(indices.tolist(), scores.tolist(), strict=True), 1)
    ]


def mark_ready() -> None:
    """Tell the harness this process has loaded its models (one file per process)."""
    ready_dir = os.environ.get("PEER_READY_DIR")
    if ready_dir:
        Path(ready_dir, f"{os.getpid()}.ready").write_text(str(os.getpid()))
