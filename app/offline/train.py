"""Train DeepFM / AutoInt on synthetic logs, export to ONNX and write the model card.

This module imports torch and is never imported by the server. The exported graph takes
``ids`` (int64 ``[batch, 16]``, per-field LOCAL ids, ``vocab_size`` = OOV bucket) and
returns ``ctr`` (float32 ``[batch]``). Per-field offsets into the shared embedding table,
OOV clamping and the down-sampling calibration all live inside the graph, so the server
only has to build the id matrix.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from app.offline import logs
from app.offline.evaluate import CTR_EDGES, auc, logloss
from app.sessions import sha256_of

logger = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "ids", "ctr"
N_FIELDS = len(logs.FIELDS)
VOCAB_SIZES: tuple[int, ...] = tuple(f.cardinality for f in logs.FIELDS)
TOP_IDS = 20
ARCHITECTURES = {"deepfm": "DeepFM", "autoint": "AutoInt"}


# -- models --------------------------------------------------------------------------------
class FieldEmbedding(nn.Module):
    """One table over all fields; each field owns ``vocab_size + 1`` rows (last = OOV)."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        sizes = torch.tensor([v + 1 for v in vocab_sizes], dtype=torch.int64)
        offsets = torch.cumsum(sizes, 0) - sizes
        # Buffers, not parameters: they become graph constants, so the offsets are baked
        # into model.onnx and the server never needs to know the table layout.
        self.register_buffer("offsets", offsets.unsqueeze(0), persistent=False)
        self.register_buffer(
            "oov", torch.tensor(vocab_sizes, dtype=torch.int64).unsqueeze(0), persistent=False
        )
        self.table = nn.Embedding(int(sizes.sum()), dim)
        nn.init.normal_(self.table.weight, std=0.01)

    def local_to_global(self, ids: torch.Tensor) -> torch.Tensor:
        # Out-of-range ids (negative or > vocab) go to the OOV row instead of silently
        # reading a neighbouring field's rows or failing the Gather.
        bad = (ids < 0) | (ids > self.oov)
        return torch.where(bad, self.oov, ids) + self.offsets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(self.local_to_global(ids))


def _mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class DeepFM(nn.Module):
    """First-order linear + FM second-order + DNN over the shared field embeddings."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int, dnn: Sequence[int], dropout: float):
        super().__init__()
        self.linear = FieldEmbedding(vocab_sizes, 1)
        self.embed = FieldEmbedding(vocab_sizes, dim)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dnn = _mlp(len(vocab_sizes) * dim, dnn, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logit ``[batch, 1]``."""
        first = self.linear(ids).sum(dim=1) + self.bias
        emb = self.embed(ids)
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)
        return first + fm + self.dnn(emb.flatten(1))


class InteractingLayer(nn.Module):
    """AutoInt multi-head self-attention over fields with a projected residual + ReLU."""

    def __init__(self, n_fields: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} not divisible by {heads} heads")
        self.n_fields, self.dim = n_fields, dim
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.residual = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Constant reshape targets (-1 for the batch) keep the exported graph free of
        # Shape/Gather/Concat chains that a traced ``x.shape`` would produce.
        q, k, v = (
            t.reshape(-1, self.n_fields, self.heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        out = (scores @ v).transpose(1, 2).reshape(-1, self.n_fields, self.dim)
        return torch.relu(out + self.residual(x))


class AutoInt(nn.Module):
    """Stacked interacting layers, a DNN on the flattened result, plus first-order terms."""

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        dim: int,
        layers: int,
        heads: int,
        dnn: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.linear = FieldEmbedding(vocab_sizes, 1)
        self.embed = FieldEmbedding(vocab_sizes, dim)
        self.bias = nn.Parameter(torch.zeros(1))
        self.attention = nn.Sequential(
            *(InteractingLayer(len(vocab_sizes), dim, heads) for _ in range(layers))
        )
        self.dnn = _mlp(len(vocab_sizes) * dim, dnn, dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logit ``[batch, 1]``."""
        first = self.linear(ids).sum(dim=1) + self.bias
        return first + self.dnn(self.attention(self.embed(ids)).flatten(1))


@dataclass(frozen=True)
class Calibration:
    """How the exported graph turns the trained logit into a served CTR.

    For negative down-sampling at rate ``w``, ``p' = p / (p + (1 - p) / w)`` equals
    ``sigmoid(logit + ln w)``; shifting the logit is the numerically stable form. On top,
    ``intercept`` (fitted on the un-down-sampled validation set) removes the ~10% low bias
    that dropout and OOV-injection noise during training leave in eval-mode predictions.
    """

    neg_sampling_rate: float
    intercept: float = 0.0

    @property
    def logit_shift(self) -> float:
        return math.log(self.neg_sampling_rate) + self.intercept

    def as_card(self) -> dict[str, Any]:
        return {
            "in_graph": True,
            "method": "negative_downsampling+valid_intercept",
            "neg_sampling_rate": self.neg_sampling_rate,
            "formula": "p / (p + (1 - p) / w), then logit += intercept",
            "downsampling_logit_shift": math.log(self.neg_sampling_rate),
            "intercept": self.intercept,
            "intercept_fitted_on": "valid",
            "logit_shift": self.logit_shift,
        }


def fit_calibration(valid_logits: np.ndarray, valid_click: np.ndarray, rate: float) -> Calibration:
    """Solve the intercept so the mean served CTR on valid equals the valid CTR."""
    z = np.asarray(valid_logits, dtype=np.float64) + math.log(rate)
    target = float(np.mean(valid_click))
    lo, hi = -5.0, 5.0
    for _ in range(60):  # the mean is monotone in the intercept: bisection is exact enough
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < target:
            lo = mid
        else:
            hi = mid
    return Calibration(rate, round(0.5 * (lo + hi), 6))


class ServingHead(nn.Module):
    """What gets exported: logit -> calibrated CTR ``[batch]`` (see :class:`Calibration`)."""

    def __init__(self, model: nn.Module, calibration: Calibration) -> None:
        super().__init__()
        self.model = model
        shift = torch.tensor(calibration.logit_shift, dtype=torch.float32)
        self.register_buffer("logit_shift", shift, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(ids) + self.logit_shift).squeeze(-1)


# -- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    embedding_dim: int
    dnn: tuple[int, ...]
    dropout: float
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    attention_layers: int = 0
    attention_heads: int = 0

    def build(self) -> nn.Module:
        if self.name == "deepfm":
            return DeepFM(VOCAB_SIZES, self.embedding_dim, self.dnn, self.dropout)
        if self.name == "autoint":
            return AutoInt(
                VOCAB_SIZES,
                self.embedding_dim,
                self.attention_layers,
                self.attention_heads,
                self.dnn,
                self.dropout,
            )
        raise ValueError(f"unknown model {self.name!r}")


# weight_decay: without it both models lose ~0.05 valid AUC in epoch 2 (rare ids of the
# 24k/12k/8k-id fields get memorised); 3e-5 keeps epochs 1-3 within ~0.001 of each other.
DEFAULT_SPECS: dict[str, ModelSpec] = {
    "deepfm": ModelSpec(
        "deepfm",
        embedding_dim=8,
        dnn=(256, 128, 64),
        dropout=0.2,
        lr=1e-3,
        batch_size=4096,
        weight_decay=3e-5,
    ),
    "autoint": ModelSpec(
        "autoint",
        embedding_dim=64,
        dnn=(256, 128),
        dropout=0.2,
        lr=1e-3,
        batch_size=4096,
        weight_decay=3e-5,
        attention_layers=3,
        attention_heads=4,
    ),
}


@dataclass(frozen=True)
class DataConfig:
    rows_train: int
    rows_valid: int
    rows_test: int
    seed_train: int = 1
    seed_valid: int = 2
    seed_test: int = 3
    neg_ratio: float | None = 150.0
    base_ctr: float = logs.DEFAULT_BASE_CTR


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    patience: int = 1
    oov_rate: float = 0.01
    seed: int = 0
    threads: int = 2


@dataclass
class Dataset:
    ids: np.ndarray
    click: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Datasets:
    train: Dataset
    valid: Dataset
    test: Dataset

    @property
    def neg_sampling_rate(self) -> float:
        return float(self.train.meta.get("neg_sampling_rate", 1.0))


def make_datasets(cfg: DataConfig) -> Datasets:
    """Train (optionally down-sampled), valid and test (never down-sampled) from one world."""

    def one(rows: int, seed: int, neg_ratio: float | None) -> Dataset:
        table = logs.generate(rows, seed, base_ctr=cfg.base_ctr, neg_ratio=neg_ratio)
        return Dataset(table.id_matrix(), table[logs.LABEL].astype(np.float32), table.meta)

    return Datasets(
        one(cfg.rows_train, cfg.seed_train, cfg.neg_ratio),
        one(cfg.rows_valid, cfg.seed_valid, None),
        one(cfg.rows_test, cfg.seed_test, None),
    )


# -- training ------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(model: nn.Module, ids: np.ndarray, batch: int = 16384) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(ids[i : i + batch])).squeeze(-1) for i in range(0, len(ids), batch)
    ]
    return torch.cat(out).numpy()


def _inject_oov(
    ids: torch.Tensor, oov: torch.Tensor, rate: float, gen: torch.Generator
) -> torch.Tensor:
    # Replacing a few ids by the OOV index trains the OOV rows, so unseen ids at serving
    # time get a learnt "average" embedding instead of the random init.
    mask = torch.rand(ids.shape, generator=gen) < rate
    return torch.where(mask, oov, ids)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    spec: ModelSpec,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> float:
    model.train()
    ids_all = torch.from_numpy(data.ids)
    y_all = torch.from_numpy(data.click)
    oov = torch.tensor(VOCAB_SIZES, dtype=torch.int64).unsqueeze(0)
    order = torch.randperm(len(ids_all), generator=gen)
    loss_fn = nn.BCEWithLogitsLoss()
    total, seen = 0.0, 0
    for start in range(0, len(order), spec.batch_size):
        idx = order[start : start + spec.batch_size]
        ids = _inject_oov(ids_all[idx], oov, cfg.oov_rate, gen)
        loss = loss_fn(model(ids).squeeze(-1), y_all[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / seen


@dataclass
class TrainResult:
    model: nn.Module
    valid_auc: float
    #: Uncalibrated validation logits of the best epoch (for the calibration intercept).
    valid_logits: np.ndarray
    epochs_run: int
    best_epoch: int
    seconds: float
    history: list[dict[str, float]]


def train_model(spec: ModelSpec, data: Datasets, cfg: TrainConfig) -> TrainResult:
    """Adam + BCE; early stopping on validation AUC, returning the best weights."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = spec.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    best_auc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    best_logits = np.zeros(0, dtype=np.float32)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = _train_epoch(model, optimizer, data.train, spec, cfg, gen)
        valid_logits = predict_logits(model, data.valid.ids)
        valid_auc = auc(valid_logits, data.valid.click)
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "valid_auc": round(valid_auc, 6),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        history.append(row)
        logger.info("epoch %s", json.dumps({"model": spec.name, **row}))
        if valid_auc > best_auc:
            best_auc, best_epoch, best_logits = valid_auc, epoch, valid_logits
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            logger.info("early stop %s at epoch %d (best %d)", spec.name, epoch, best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - started
    return TrainResult(model, best_auc, best_logits, epoch, best_epoch, seconds, history)


# -- export --------------------------------------------------------------------------------
def export_onnx(head: nn.Module, path: Path) -> None:
    """Export ``head`` with ``ids`` int64 [batch, 16] -> ``ctr`` float32 [batch]."""
    head.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((2, N_FIELDS), dtype=torch.int64)
    with warnings.catch_warnings():
        # The TorchScript exporter still works and yields a plain opset-17 graph, but it
        # (and helpers it calls) emit DeprecationWarnings; scoped to this call only, so the
        # test suite's "warnings are errors" stays in force everywhere else.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            head,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    check_onnx(path)


def check_onnx(path: Path) -> None:
    """onnx.checker plus the contract: names, dtypes, no float64 anywhere."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [
        OUTPUT_NAME
    ]:
        raise ValueError(f"{path}: unexpected graph inputs/outputs")
    double = onnx.TensorProto.DOUBLE
    typed = [*graph.input, *graph.output, *graph.value_info]
    bad = [v.name for v in typed if v.type.tensor_type.elem_type == double]
    bad += [t.name for t in graph.initializer if t.data_type == double]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == double:
                bad.append(node.name)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == double:
                bad.append(node.name)
    if bad:
        raise ValueError(f"{path}: float64 in graph: {bad[:5]}")


def onnx_predict(path: Path, ids: np.ndarray, batch: int = 65536) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: ids[i : i + batch]})[0]
        for i in range(0, len(ids), batch)
    ]
    return np.concatenate(outs)


def verify_export(head: nn.Module, path: Path, ids: np.ndarray, tol: float = 1e-5) -> float:
    """Compare ONNX Runtime and torch on ``ids``; return the max abs difference."""
    with torch.no_grad():
        expected = head(torch.from_numpy(ids)).numpy()
    got = onnx_predict(path, ids)
    if got.dtype != np.float32 or got.shape != (len(ids),):
        raise ValueError(f"ONNX output {got.dtype} {got.shape}, want float32 ({len(ids)},)")
    diff = float(np.max(np.abs(got - expected)))
    if diff >= tol:
        raise ValueError(f"ONNX vs torch max abs diff {diff:.3g} >= {tol}")
    return diff


# -- model card ----------------------------------------------------------------------------
def field_distribution(ids: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per field: the 20 most frequent ids with their shares, and the OOV share."""
    out: dict[str, dict[str, Any]] = {}
    n = len(ids)
    for j, spec in enumerate(logs.FIELDS):
        col = ids[:, j]
        oov = (col < 0) | (col >= spec.cardinality)
        counts = np.bincount(col[~oov], minlength=spec.cardinality)
        # Stable sort on -count: ties resolve to the smaller id, so cards are reproducible.
        top = np.argsort(-counts, kind="stable")[:TOP_IDS]
        out[spec.name] = {
            "top_ids": top.tolist(),
            "top_shares": [round(float(counts[i]) / n, 6) for i in top],
            "oov_rate": round(float(oov.mean()), 6),
        }
    return out


def ctr_histogram(ctr: np.ndarray) -> dict[str, list[float]]:
    counts, _ = np.histogram(np.asarray(ctr, dtype=np.float64), bins=np.asarray(CTR_EDGES))
    return {"edges": list(CTR_EDGES), "shares": (counts / counts.sum()).tolist()}


def hyperparameters(spec: ModelSpec, cfg: TrainConfig, calibration: Calibration) -> dict[str, Any]:
    hp: dict[str, Any] = {"embedding_dim": spec.embedding_dim, "dnn": list(spec.dnn)}
    if spec.attention_layers:
        hp |= {"attention_layers": spec.attention_layers, "attention_heads": spec.attention_heads}
        hp["attention_residual"] = True
    hp |= {
        "first_order": True,
        "dropout": spec.dropout,
        "optimizer": "adam",
        "lr": spec.lr,
        "weight_decay": spec.weight_decay,
        "batch_size": spec.batch_size,
        "patience": cfg.patience,
        "oov_injection_rate": cfg.oov_rate,
        "shared_embedding_table": True,
        "calibration": calibration.as_card(),
    }
    return hp


def _plain_number(value: float | None) -> float | int | None:
    """150.0 -> 150, so the card reads like the CLI flag that produced it."""
    return int(value) if value is not None and float(value).is_integer() else value


def write_card(
    out_dir: Path,
    spec: ModelSpec,
    version: str,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    result: TrainResult,
    calibration: Calibration,
    data: Datasets,
    test_ctr: np.ndarray,
) -> dict[str, Any]:
    model_path = out_dir / "model.onnx"
    card = {
        "name": spec.name,
        "version": version,
        "architecture": ARCHITECTURES[spec.name],
        "hyperparameters": hyperparameters(spec, train_cfg, calibration),
        "fields": [
            {"name": f.name, "vocab_size": f.cardinality, "oov_index": f.cardinality}
            for f in logs.FIELDS
        ],
        "input": {"name": INPUT_NAME, "dtype": "int64", "shape": ["batch", N_FIELDS]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"]},
        "opset": OPSET,
        "sha256": sha256_of(model_path),
        "size_bytes": model_path.stat().st_size,
        "training": {
            "rows_train": len(data.train.ids),
            "rows_valid": len(data.valid.ids),
            "rows_test": len(data.test.ids),
            "seed_train": data_cfg.seed_train,
            "seed_valid": data_cfg.seed_valid,
            "seed_test": data_cfg.seed_test,
            "neg_ratio": _plain_number(data_cfg.neg_ratio),
            "base_ctr": data_cfg.base_ctr,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "train_seconds": round(result.seconds, 1),
            "torch_version": torch.__version__,
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "metrics": {
            "valid_auc": round(result.valid_auc, 6),
            "test_auc": round(auc(test_ctr, data.test.click), 6),
            "test_logloss": round(logloss(test_ctr, data.test.click), 6),
        },
        "distribution": {
            "fields": field_distribution(data.test.ids),
            "ctr_histogram": ctr_histogram(test_ctr),
            "ctr_mean": round(float(np.mean(test_ctr, dtype=np.float64)), 8),
        },
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


# -- pipeline ------------------------------------------------------------------------------
def run(
    name: str,
    data: Datasets,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    out_root: Path,
    version: str,
    spec: ModelSpec | None = None,
) -> dict[str, Any]:
    """Train, export, verify and write ``out_root/<name>/<version>/{model.onnx,card.json}``."""
    spec = spec or DEFAULT_SPECS[name]
    result = train_model(spec, data, train_cfg)
    out_dir = out_root / name / version
    model_path = out_dir / "model.onnx"
    calibration = fit_calibration(result.valid_logits, data.valid.click, data.neg_sampling_rate)
    head = ServingHead(result.model, calibration).eval()
    export_onnx(head, model_path)
    diff = verify_export(head, model_path, data.test.ids[:1000])
    # Test metrics come from ONNX Runtime, i.e. from exactly what will be served.
    test_ctr = onnx_predict(model_path, data.test.ids)
    card = write_card(
        out_dir, spec, version, data_cfg, train_cfg, result, calibration, data, test_ctr
    )
    summary = {
        "model": name,
        "path": str(model_path),
        "size_bytes": card["size_bytes"],
        **card["metrics"],
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": card["training"]["train_seconds"],
        "onnx_max_abs_diff": diff,
        "calibration_intercept": calibration.intercept,
        "test_ctr_mean": card["distribution"]["ctr_mean"],
        "test_click_rate": round(float(np.mean(data.test.click)), 6),
    }
    logger.info("done %s", json.dumps(summary))
    return summary
