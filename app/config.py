"""One typed, frozen configuration for the whole farm.

Precedence, lowest first: defaults < TOML file (``CTR_FARM_CONFIG``) < environment
(``CTR_FARM_<SETTING>``) < command-line flags. This is the only module that reads
``os.environ``; everything else receives a :class:`Config`.

A bad value stops the boot with a message that names the setting
(:class:`ConfigError`), never a traceback deep inside a worker.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

#: ``stage1_k`` when neither the request nor the first stage's ``keep_k`` sets it.
DEFAULT_STAGE1_K = 100
ENV_PREFIX = "CTR_FARM_"
#: prometheus_client's own variable: set (to ``Config.metrics_path``) by the gunicorn
#: config for the workers; its presence switches the metrics to multiprocess mode.
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
ENV_FILE = "CTR_FARM_CONFIG"
REPO_ROOT = Path(__file__).resolve().parent.parent

Positive = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


class StageConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stage of the cascade: which model scores, and how many candidates it keeps.

    ``keep_k`` of the first stage is the request's ``stage1_k`` default; the last stage
    always keeps the request's ``top_k``. Middle stages (if any) keep ``keep_k``.
    """

    model: str
    keep_k: Positive | None = None


Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class VariantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One arm of an A/B split: a name, a share of the keys, and the model settings it
    changes (empty: the farm's own ``deepfm_model`` / ``autoint_model``)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    weight: Share
    deepfm_model: str = ""
    autoint_model: str = ""


class CanaryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A rollout of other model settings to a growing share of traffic (the variant
    ``canary``; the rest is ``stable``), judged against ``stable`` before each step."""

    deepfm_model: str = ""
    autoint_model: str = ""
    #: Share of the keys on the canary at each step; the last step is the rollout's end.
    steps: tuple[Share, ...] = (0.01, 0.05, 0.25, 1.0)
    #: Time on each step before it may advance (if the canary is within its bounds).
    step_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: Canary requests a step needs before it is judged (fewer: the step waits).
    min_requests: Positive = 50
    #: Canary error rate may exceed stable's by this much (errors: 5xx answers and
    #: rankings degraded by a failing or stopped model).
    max_error_rate_delta: Share = 0.01
    #: Canary p99 may be this many times stable's.
    max_p99_ratio: Annotated[float, msgspec.Meta(ge=1.0)] = 1.5
    #: Mean overlap with what stable returns for the same request (top-k), and with
    #: what stable's stage 1 keeps, on a sampled ``compare_share`` of canary requests.
    min_topk_overlap: Share = 0.5
    min_stage1_overlap: Share = 0.7
    compare_share: Share = 0.25


class ShadowConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Other model settings run off the request path on a sampled share of ``/rank``."""

    deepfm_model: str = ""
    autoint_model: str = ""
    share: Share = 0.1


#: Config fields typed as structs: TOML tables in the file, JSON in env and flags.
STRUCT_FIELDS = ("variants", "canary", "shadow")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every setting of the farm, typed and documented once."""

    # -- models ------------------------------------------------------------------------
    #: Each model's repository (``models/<name>``: its newest valid version serves, and a
    #: reload moves to a newer one) or one version dir (``models/<name>/<version>``,
    #: holding model.onnx + card.json: pinned). See app/registry.py.
    deepfm_model: str = "models/deepfm"
    autoint_model: str = "models/autoint"
    #: The cascade, in order. A third stage or another model is a config change.
    stages: tuple[StageConfig, ...] = (
        StageConfig(model="deepfm", keep_k=100),
        StageConfig(model="autoint"),
    )
    #: Model that scores ``/predict`` and the single-stage baseline (``multi_stage: false``).
    predict_model: str = "autoint"
    #: Verify the sha256 in card.json against model.onnx at load time.
    verify_sha256: bool = True

    # -- traffic: A/B, canary, shadow (app/traffic.py) --------------------------------
    #: A/B split: each request goes to one variant by a stable hash of its key
    #: (``X-User-Key`` header or ``user_key`` field; else its request id). Weights sum
    #: to 1. Empty: one variant, ``stable``.
    variants: tuple[VariantConfig, ...] = ()
    #: A canary rollout (not together with ``variants``).
    canary: CanaryConfig | None = None
    #: Shadow model settings, compared off the request path.
    shadow: ShadowConfig | None = None
    #: Salt of the A/B hash: another salt reshuffles which keys land where.
    split_salt: str = "ctr-farm"

    # -- sessions ----------------------------------------------------------------------
    #: ONNX Runtime sessions per model per worker process (bounds concurrent inference).
    pool_size: Positive = 1
    intra_threads: Positive = 1
    inter_threads: Positive = 1
    #: Where a request's decode + inference runs: ``executor`` = a thread pool of
    #: ``pool_size`` threads, so the event loop keeps serving during a long ranking;
    #: ``inline`` = on the event loop thread (no thread hop); ``auto`` = inline for bodies
    #: up to ``inline_max_body_bytes`` (single predictions: the hop is ~20% of their CPU),
    #: the executor above it (rankings: the loop must not stall for their milliseconds).
    inference: Literal["auto", "executor", "inline"] = "auto"
    inline_max_body_bytes: Annotated[int, msgspec.Meta(ge=0)] = 16 * 1024
    #: Micro-batching of concurrent one-candidate ``/predict`` calls that run inline
    #: (app/batching.py): at most this many rows per model run; 1 = off. On: 2 workers x
    #: pool 1 did 1.4-1.9x the /predict RPS at 0.55-0.67x the worker CPU per request
    #: (docs/results/issue5_predict.md).
    predict_batch_max: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: How long a batch waits for more rows after its first, beyond the event loop's
    #: next turn (0: only the requests that arrived in the same turn share a run).
    predict_batch_wait_us: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    #: Warm-up batches per session before ``/ready`` says yes.
    warmup_runs: Annotated[int, msgspec.Meta(ge=0)] = 3
    #: The sessions of a pool share one copy of each model's weights (ORT shared
    #: initializers) instead of one copy per session.
    share_weights: bool = True
    #: The sessions of a worker allocate intermediate tensors from one shared ORT arena
    #: instead of an arena each (each keeps the peak of its largest batch for good).
    #: Both on: pool 6 holds 167 MiB per worker instead of 526, pool 1 155 instead of 149,
    #: same CPU per call (docs/results/memory.md).
    shared_arena: bool = True
    #: ORT's memory pattern (``SessionOptions.enable_mem_pattern``): after a first run per
    #: input shape, one block sized for the whole run, planned ahead. Off: ORT allocates
    #: tensor by tensor from the arena, which the next runs reuse. The planned block comes
    #: on top of the arena's chunks from the first run (an arena never shrinks): an AutoInt
    #: run on 1000 rows left 63 MiB in the arena with it, 32 without. Off: 33 MiB less per
    #: worker at every pool size, the cascade's ORT time 0.97-1.01x, but one-row runs
    #: (/predict of one candidate) +5-7%, ~9 us (docs/results/issue5_decode_memory.md).
    mem_pattern: bool = False
    #: ORT's weight prepacking (off: ``session.disable_prepacking``). A session prepacks
    #: the weights of its MatMul/Gemm nodes into a layout of its own, one copy per session
    #: even with ``share_weights`` (the Python API has no shared prepacked-weights
    #: container): at pool 6 that was ~10 MiB per worker (docs/results/issue5_decode_memory.md).
    prepack_weights: bool = True
    #: Write an ONNX Runtime profile (per-node timings, Chrome trace JSON) per session to
    #: ``<run_dir>/ort-profiles/``, when the worker closes. For short diagnostic runs: an
    #: AutoInt run on 100 rows took 18% longer, and each run adds ~58 KB of events that
    #: ORT holds in memory until then.
    ort_profiling: bool = False
    #: Rows of first-stage scores cached per worker, keyed by (candidate ids, model version)
    #: (app/cache.py; rounded up to a multiple of 8, ~100 bytes per row); 0 = no cache.
    #: Off by default: it costs ~6% when candidates never repeat and saves 10% (half of
    #: them repeat) to 30% (90%): docs/BENCHMARKS.md, "Result cache".
    cache_entries: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    #: A cached score is used for at most this long after it was computed.
    cache_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0

    # -- request limits (documented in README "Limits") -------------------------------
    max_candidates: Positive = 5000
    max_body_bytes: Positive = 8 * 1024 * 1024
    default_top_k: Positive = 10
    max_predict_candidates: Positive = 64

    # -- overload, deadlines, breakers (docs/RELIABILITY.md) ---------------------------
    #: Budget of a request that names none (``timeout_ms`` / ``X-Request-Timeout-Ms``),
    #: counted from when nginx received it.
    default_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] = 1000
    #: Requests that may wait for an inference slot in one worker; more are shed (503).
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 32
    #: No request waits longer than this for a slot (nor past its own deadline).
    max_queue_wait_ms: Positive = 500
    #: Waiters are served cheapest first; one that has waited this long goes first.
    queue_aging_ms: Positive = 50
    #: Consecutive failures (errors, non-finite scores, runs stopped at the deadline)
    #: that open a model's circuit breaker; after ``breaker_reset_s`` one trial runs.
    breaker_failures: Positive = 5
    breaker_reset_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: Ranking answered when no stage can: ``popular`` (candidates ordered by their
    #: creative's share of training impressions, from the model card) or ``none`` (503).
    fallback: Literal["popular", "none"] = "popular"
    #: ``Retry-After`` seconds on every 503 the app sends.
    retry_after_s: Positive = 1
    #: nginx's cap on concurrent requests per worker (``max_conns``; 0 = none). Requests
    #: beyond it get nginx's JSON 503 without costing a worker anything.
    upstream_max_conns: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: The heavy lane, for farms that must hold goodput under overload: ``/rank`` bodies of
    #: at least this many bytes (e.g. 10000; a power of ten, as nginx compares the
    #: length's digits; 0 = off) go to each worker with at most ``heavy_lane_max_conns``
    #: in flight; beyond that nginx answers the JSON 503 + ``Retry-After`` itself in well
    #: under a millisecond, so refusing a large ranking costs a worker nothing. The price:
    #: a short stall can refuse a few large rankings even at low load (docs/RELIABILITY.md,
    #: overload). Smaller requests are never capped by nginx.
    heavy_lane_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Large rankings in flight per worker (0: ``pool_size + 2``, one running per
    #: inference thread and two waiting).
    heavy_lane_max_conns: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Bearer token of the ``/admin/*`` endpoints (reachable on the workers' unix sockets
    #: only; nginx answers 404). Empty: the admin endpoints answer 403.
    admin_token: str = ""

    # -- observability (README "Monitoring") -------------------------------------------
    #: Latency objective of ``/rank``: an answer (2xx) within it counts towards goodput
    #: (``ctr_farm_sla_requests_total{outcome="within"}``). The clock starts when nginx
    #: received the request (``X-Request-Start``), like the deadline's.
    sla_rank_ms: Annotated[float, msgspec.Meta(gt=0, le=600_000)] = 50.0
    #: Latency objective of ``/predict`` (as ``sla_rank_ms``).
    sla_predict_ms: Annotated[float, msgspec.Meta(gt=0, le=600_000)] = 20.0
    #: Seconds of recent traffic behind ``/stats`` throughput, goodput and compliance.
    stats_window_s: Annotated[int, msgspec.Meta(ge=10, le=86_400)] = 60
    #: SQLite file (WAL) of one row per ``/rank`` / ``/predict`` request, written by a
    #: background thread per worker; relative to ``run_dir``; empty = off.
    #: ``scripts/report.py`` turns it into a latency / goodput report.
    request_log: str = ""
    #: Rows a worker may hold for its writer thread; a request finding it full is not
    #: delayed: its row is dropped and counted (``ctr_farm_request_log_dropped_total``).
    request_log_queue: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    #: Model monitoring: PSI of each model's inputs and predicted CTR against its card's
    #: training distribution; a model whose worst feature reaches this is ``warn``.
    drift_psi_warn: Annotated[float, msgspec.Meta(gt=0)] = 0.1
    #: The PSI from which a model is ``alert`` (above ``drift_psi_warn``).
    drift_psi_alert: Annotated[float, msgspec.Meta(gt=0)] = 0.25
    #: Seconds of traffic the drift PSI is computed over.
    drift_window_s: Annotated[int, msgspec.Meta(ge=10, le=86_400)] = 300
    #: Sampled candidate rows a model's window needs before its PSI is judged.
    drift_min_rows: Annotated[int, msgspec.Meta(ge=1)] = 2000
    #: One candidate row in this many is accumulated (systematic sample across requests):
    #: 1 = every row. PERF: a 1000-candidate ranking costs 27 us at 8, 79 us at 1
    #: (scripts/bench_observe.py; the ranking itself ~11 ms).
    drift_sample_every: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 8

    # -- front proxy limits (nginx; README "Limits") -----------------------------------
    #: Requests per second nginx admits from one client address (``$binary_remote_addr``);
    #: the excess is answered 429 ``rate_limited`` with ``Retry-After``, never reaching a
    #: worker. 0 turns the limit off. The default is a backstop against a runaway client,
    #: well above what this farm serves (~4k ``/predict``/s on 2 cores), so the benchmarks,
    #: which drive 4-5k requests/s from 127.0.0.1 alone, are never throttled.
    rate_limit_rps: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 10_000
    #: Requests one client may send above the rate at once; they are answered at once
    #: (``nodelay``), not queued. nginx counts time in milliseconds per event-loop turn, so
    #: the burst must cover a client's concurrent connections (wrk's 100) arriving together.
    rate_limit_burst: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 1000
    #: Time a client has to send its whole request head. nginx then closes the connection
    #: without an answer (logged as 408), so a slowloris client cannot pin a connection.
    client_header_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    #: Longest pause between two reads of a request body (a pause, not the whole body:
    #: nginx buffers the body before a worker sees it, so a trickle pins no worker).
    client_body_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10
    #: Longest pause between two writes of a response to a client that stopped reading.
    send_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 10

    # -- processes and network ---------------------------------------------------------
    workers: Positive = 2
    worker_class: Literal["uvicorn", "gthread", "sync"] = "uvicorn"
    #: Threads per worker when ``worker_class`` is gthread.
    threads: Positive = 1
    host: str = "127.0.0.1"
    #: The port nginx listens on.
    port: Port = 8080
    #: Give every gunicorn worker its own unix socket so nginx balances across them
    #: (see docs/ARCHITECTURE.md for the measured split); else one shared socket.
    per_worker_sockets: bool = True
    #: Runtime directory for sockets, pid files and nginx temp files.
    run_dir: str = "run"
    #: nginx's idle keepalive to the upstream; gunicorn's keepalive is kept above it.
    upstream_keepalive_s: Positive = 60
    graceful_timeout_s: Positive = 30
    worker_timeout_s: Positive = 60
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # -- tracing (README "Dashboards and tracing"; app/tracing.py) --------------------
    #: OpenTelemetry spans, one per request and a child per cascade stage, with the
    #: request id as ``ctr_farm.request_id``: ``off`` (OpenTelemetry is never imported),
    #: ``stdout`` (one JSON line per span on the worker's stdout, written as each span
    #: ends) or ``otlp`` (OTLP/HTTP protobuf to ``otlp_endpoint``, batched in the
    #: background). Needs the ``tracing`` extra (``pip install -e '.[tracing]'``).
    tracing: Literal["off", "stdout", "otlp"] = "off"
    #: Where ``otlp`` posts spans: an OpenTelemetry Collector's (or Jaeger's, Tempo's)
    #: OTLP/HTTP traces URL.
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    #: Share of traces recorded (0 to 1). A request with a W3C ``traceparent`` header joins
    #: its caller's trace and follows the caller's sampling decision.
    trace_sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    #: nginx binary (found on PATH or /usr/sbin).
    nginx_bin: str = "nginx"

    # -- monitoring (optional; README "Monitoring") -------------------------------------
    #: Also run a Prometheus server (the Procfile's ``prometheus`` entry) that scrapes the
    #: farm's ``/metrics`` through nginx. Needs the Debian package (scripts/install
    #: --monitoring).
    prometheus: bool = False
    #: Where that Prometheus listens, on 127.0.0.1 only (9090, Prometheus' usual port, is
    #: the one Debian's own prometheus.service takes).
    prometheus_port: Port = 9190
    prometheus_scrape_interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5
    #: Samples older than this are deleted (its data lives in ``<run_dir>/prometheus``).
    prometheus_retention_h: Annotated[int, msgspec.Meta(ge=1, le=24 * 366)] = 6
    prometheus_bin: str = "prometheus"

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        known = set(self.model_dirs())
        for i, stage in enumerate(self.stages):
            if stage.model not in known:
                raise ConfigError(
                    f"stages[{i}].model: unknown model {stage.model!r}; known: {sorted(known)}"
                )
        if self.predict_model not in known:
            raise ConfigError(f"predict_model: unknown model {self.predict_model!r}")
        if self.drift_psi_warn >= self.drift_psi_alert:
            raise ConfigError(
                f"drift_psi_warn: {self.drift_psi_warn} must be below drift_psi_alert"
                f" ({self.drift_psi_alert})"
            )
        self._check_traffic()
        # Requests that rely on the defaults must be valid: top_k <= every stage's keep_k.
        for i, stage in enumerate(self.stages[:-1]):
            if i > 0 and stage.keep_k is None:
                raise ConfigError(f"stages[{i}].keep_k: a middle stage needs keep_k")
            if stage.keep_k is not None and stage.keep_k < self.default_top_k:
                raise ConfigError(
                    f"stages[{i}].keep_k: {stage.keep_k} is below default_top_k"
                    f" ({self.default_top_k})"
                )
        if self.heavy_lane_bytes and 10 ** (len(str(self.heavy_lane_bytes)) - 1) != (
            self.heavy_lane_bytes
        ):
            raise ConfigError(
                f"heavy_lane_bytes: {self.heavy_lane_bytes} must be 0 or a power of ten"
            )
        if self.tracing != "off":
            _require_tracing(self.tracing, self.otlp_endpoint)

    def _check_traffic(self) -> None:
        if self.variants:
            names = [v.name for v in self.variants]
            if len(set(names)) != len(names):
                raise ConfigError(f"variants: names must be unique, got {names}")
            total = sum(v.weight for v in self.variants)
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(f"variants: weights must sum to 1, got {total:g}")
            if self.canary is not None:
                raise ConfigError("canary: a canary rollout cannot run beside A/B variants")
        if self.canary is not None and list(self.canary.steps) != sorted(self.canary.steps):
            raise ConfigError(f"canary.steps: must not decrease, got {list(self.canary.steps)}")

    # -- derived values ------------------------------------------------------------------
    @property
    def heavy_lane_conns(self) -> int:
        """Large rankings nginx lets into one worker at once."""
        return self.heavy_lane_max_conns or self.pool_size + 2

    def model_dirs(self, override: Any = None) -> dict[str, Path]:
        """Model name -> absolute directory (repository or pinned version) it serves from;
        ``override`` (a variant, canary or shadow config) replaces the settings it sets."""
        deepfm = (override and override.deepfm_model) or self.deepfm_model
        autoint = (override and override.autoint_model) or self.autoint_model
        return {"deepfm": self.path(deepfm), "autoint": self.path(autoint)}

    def path(self, value: str) -> Path:
        """Resolve a configured path against the repository root."""
        p = Path(value)
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def run_path(self) -> Path:
        return self.path(self.run_dir)

    @property
    def ort_profile_path(self) -> Path:
        return self.run_path / "ort-profiles"

    @property
    def default_stage1_k(self) -> int:
        return self.stages[0].keep_k or DEFAULT_STAGE1_K

    @property
    def gunicorn_keepalive_s(self) -> int:
        # Keep gunicorn's idle keepalive above nginx's so nginx never sends a request
        # on a connection the worker is closing at the same moment.
        return self.upstream_keepalive_s + 15

    @property
    def request_log_path(self) -> Path | None:
        return self.run_path / self.request_log if self.request_log else None

    def sla_ms(self, endpoint: str) -> float | None:
        """The latency objective of an endpoint (route template), None if it has none."""
        return {"/rank": self.sla_rank_ms, "/predict": self.sla_predict_ms}.get(endpoint)

    @property
    def metrics_path(self) -> Path:
        """Where the workers' prometheus_client files live (emptied at every start)."""
        return self.run_path / "metrics"

    def worker_socket(self, slot: int) -> Path:
        return self.run_path / f"worker-{slot}.sock"

    @property
    def shared_socket(self) -> Path:
        return self.run_path / "gunicorn.sock"

    @property
    def prometheus_path(self) -> Path:
        """The Prometheus server's data directory (its TSDB)."""
        return self.run_path / "prometheus"


#: Modules each tracing mode needs (the ``tracing`` extra of pyproject.toml).
TRACING_MODULES = {
    "stdout": ("opentelemetry.sdk.trace",),
    "otlp": ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"),
}


def _require_tracing(mode: str, endpoint: str) -> None:
    """Stop the boot, naming the setting, when tracing is on but cannot work."""
    for name in TRACING_MODULES[mode]:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            raise ConfigError(
                f"tracing: {mode!r} needs the OpenTelemetry packages ({name} is not"
                " installed): pip install -e '.[tracing]', or set tracing = \"off\""
            )
    if mode == "otlp" and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"otlp_endpoint: expected an http(s) URL, got {endpoint!r}")


def prometheus_multiproc_dir(env: Mapping[str, str] | None = None) -> str | None:
    """The metrics directory shared by the workers, or None in a single process."""
    return (os.environ if env is None else env).get(PROMETHEUS_ENV) or None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _fields() -> dict[str, Any]:
    return {f.name: f for f in msgspec.structs.fields(Config)}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in _fields().items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if name == "stages":
            # "deepfm:100,autoint" -> stages; the TOML file is the richer form.
            out[name] = parse_stages(raw)
        elif name in STRUCT_FIELDS:
            if raw.strip():  # empty: the default (no variants, no canary, no shadow)
                out[name] = _json_setting(name, raw)
        elif field.type is bool:
            word = raw.strip().lower()
            if word not in _TRUE + _FALSE:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected a boolean, got {raw!r}")
            out[name] = word in _TRUE
        else:
            out[name] = raw
    return out


def _json_setting(name: str, raw: str) -> Any:
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected JSON: {exc}") from exc


def parse_stages(text: str) -> list[dict[str, Any]]:
    """``"deepfm:100,autoint"`` -> stage dicts (the env and CLI form of ``stages``)."""
    stages = []
    for part in filter(str.strip, text.split(",")):
        model, _, keep = part.partition(":")
        stages.append({"model": model.strip(), "keep_k": keep.strip() or None})
    return stages


def load(
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
) -> Config:
    """Build the Config: defaults < file < env < ``overrides`` (CLI flags)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    file = file or env.get(ENV_FILE)
    if file:
        try:
            merged.update(tomllib.loads(Path(file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{ENV_FILE}: cannot read config file {file!s}: {exc}") from exc
    merged.update(_from_env(env))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        merged[key] = (
            _json_setting(key, value) if key in STRUCT_FIELDS and isinstance(value, str) else value
        )
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc


def to_env(config: Config) -> dict[str, str]:
    """The environment that reproduces ``config`` in child processes (honcho, gunicorn)."""
    out: dict[str, str] = {}
    for name in _fields():
        value = getattr(config, name)
        if name == "stages":
            value = ",".join(f"{s.model}:{s.keep_k}" if s.keep_k else s.model for s in value)
        elif name in STRUCT_FIELDS:
            value = msgspec.json.encode(value).decode() if value else ""
        elif isinstance(value, bool):
            value = "1" if value else "0"
        out[ENV_PREFIX + name.upper()] = str(value)
    return out
