"""Typed configuration: one dataclass tree, loaded from YAML with `key.sub=value` overrides.

Every number a user may want to change lives here with its default (SPEC section 4).
Loading validates types and ranges and raises `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sscq_dist.errors import ConfigError
from sscq_dist.records import build_record

BITS_CHOICES = (16, 32, 64)
BACKBONES = ("small_cnn", "vgg8", "resnet18_cifar", "resnet50")
INDEX_TYPES = ("pq_fastscan", "ivf_pq_fastscan")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class StorageConfig:
    # S3-compatible endpoint (MinIO, a dev server); None = AWS_ENDPOINT_URL or AWS itself.
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    # One retry policy owns every attempt of an object-store call: botocore and s3fs make a
    # single HTTP try each, and we retry up to max_attempts with exponential backoff.
    max_attempts: int = 4
    retry_backoff_s: float = 0.5
    # Per HTTP try: seconds to connect, and to wait for the next bytes of an answer.
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    # One call with all its tries ends within this many seconds, even on an endpoint that
    # accepts connections and never answers: no retry starts that could outlast it, and
    # the timeouts above are cut to it.
    deadline_s: float = 60.0


@dataclass
class AugmentConfig:
    crop_scale_min: float = 0.35
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 0.75
    crop_ratio_max: float = 1.333
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 1.0
    # Off by default (issue 25, item 4): a rotation uniform in [-rotate_deg, rotate_deg] of
    # every view, and random erasing (a rectangle of erase_scale of the image area, aspect
    # ratio log-uniform in [1/3, 3], filled with the normalised mean) with probability erase_p.
    # While both are off, views are drawn exactly as before (one random draw per view).
    rotate_deg: float = 0.0
    erase_p: float = 0.0
    erase_scale_min: float = 0.02
    erase_scale_max: float = 0.2


@dataclass
class DataConfig:
    train_uri: str = "data/digits/train"
    # Held-out queries for evaluation and the promotion gate (never used for training).
    queries_uri: str = "data/digits/test"
    # Database for evaluation; defaults to the training images (SPEC section 5 protocol).
    database_uri: Optional[str] = None
    image_size: int = 28
    channels: int = 1
    # Rows per Ray Data decode/augment task batch.
    decode_batch_size: int = 256
    # Batches each training worker prefetches from the stream (streaming path; a cached set
    # is already in memory).
    prefetch_batches: int = 4
    # Rows shuffled locally by each training worker's iterator (0 = off; streaming path: a
    # cached set's ranks shuffle all their rows of the epoch).
    shuffle_buffer: int = 1024
    # Training sets up to this many rows are decoded once and cached in the object store
    # (uint8, C*H*W bytes per image), and every epoch iterates the cache in a new seeded
    # block order; larger ones are read and decoded again every epoch.
    cache_max_rows: int = 2_000_000
    # Stop training (one error line, no model registered) when more than this share of the
    # training rows does not decode. A clean collection drops nothing (digits, Fashion-MNIST:
    # 0) and sporadic corrupt files in a crawl stay far below 1 %; a systematic fault (wrong
    # codec, truncated or foreign shards) crosses it, and training on what is left would
    # register a model of a silently different collection.
    max_drop_fraction: float = 0.01
    # Decoded pixels above this count are refused (decompression-bomb guard).
    max_image_pixels: int = 50_000_000
    # Ingest cuts a shard's row groups at this many rows or this many image bytes, whichever
    # comes first, so a thumbnail reads one small row group (one column chunk), not the shard.
    row_group_rows: int = 1024
    row_group_bytes: int = 8 * 1024 * 1024
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"
    # small_cnn / vgg8 channel multiplier (encoder capacity; cost grows with its square).
    width: float = 1.0
    bits: int = 32
    num_codewords: int = 16  # K; 16 means 4-bit codes (FAISS fast-scan)
    codeword_dim: int = 16  # d
    head_hidden: int = 512
    # Projection head depth: 2 = Linear-ReLU-Linear (the authors' head), 1 = one Linear
    # (keeps more of the backbone's features in the quantized embedding).
    head_layers: int = 2
    # L2-normalise the embedding f and scale it by sqrt(M) (sub-vectors of unit mean
    # squared norm), so quantizer distances follow cosine; tau_q must move with it.
    normalize_embedding: bool = False
    tau_q: float = 0.2
    # SyncBatchNorm on GPU workers; torch refuses it on CPU tensors.
    sync_batchnorm: bool = True

    @property
    def num_codebooks(self) -> int:
        """M = bits / log2(K)."""
        return self.bits // int(round(math.log2(self.num_codewords)))

    @property
    def embedding_dim(self) -> int:
        return self.num_codebooks * self.codeword_dim


@dataclass
class LossConfig:
    w_icf: float = 1.0
    w_icz: float = 1.0
    w_cc: float = 0.4
    w_pn: float = 0.1
    w_cd: float = 0.2
    tau_ic: float = 0.5
    tau_cc: float = 0.2
    tau_pn: float = 0.5
    tau_cd: float = 0.2
    num_neighbors: int = 20
    # Additions to the two NT-Xent terms (L_icf, L_icz), off at 0 (issue 25, item 5): the
    # debiased negatives' class prior tau+ in [0, 1), and k hardest negatives cancelled.
    debias_tau_plus: float = 0.0
    fn_cancel_k: int = 0


@dataclass
class BankConfig:
    enabled: bool = False
    size: int = 4096  # Q, split evenly over workers
    warmup_epochs: int = 1


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    global_batch_size: int = 256
    epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 1e-5
    # adam, or sgd (Nesterov, train.momentum; issue 25: +0.009 mAP over Adam with the VGG-8
    # encoder at lr 0.1, wd 5e-4 in BENCHMARKS.md's recipe study).
    optimizer: str = "adam"
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    zero_stage: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    # Ray Train run storage (checkpoints); a local dir or s3:// URI.
    storage_path: str = "runs"
    run_name: str = "sscq-digits"
    max_failures: int = 2
    # Checkpoint (every rank saves, then report) every N epochs and after the last one.
    checkpoint_every_epochs: int = 1
    # Also checkpoint every N global steps inside an epoch (0 = off): a failure then costs at
    # most N steps, not the rest of a long epoch.
    checkpoint_every_steps: int = 0
    # Speed switches; null = auto: on for CUDA workers (bf16 only where the GPU supports
    # it); bf16 and channels_last also on CPUs with bf16 hardware, AMX or AVX-512 bf16 (1.5-2.2x
    # and 2.0x, issue 25), all off on other CPUs (BENCHMARKS.md); true/false force.
    # bf16: forward under torch.autocast(bfloat16), fp32 weights and losses.
    bf16: Optional[bool] = None
    # channels_last: model and augmented views in channels-last memory format (ZeRO 0 only:
    # ZeRO 1-3 keep the weights in flat buffers in the default layout; auto is off there).
    channels_last: Optional[bool] = None
    # compile: torch.compile of the model (in place, checkpoints unchanged).
    compile: Optional[bool] = None
    # Checkpoints Ray Train keeps per run (0 = all; the quality benchmark evaluates each one).
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    # Cap on steps per epoch (0 = a full pass); used for smoke tests and benchmarks.
    max_steps_per_epoch: int = 0
    # Training time budget in minutes (0 = off): the lr schedule is laid out over the steps
    # that fit, from the step rate measured after warm-up (re-measured at every epoch end),
    # and training stops there with a final checkpoint. train.epochs still caps the run.
    time_budget_minutes: float = 0.0


@dataclass
class TrackingConfig:
    # None = MLFLOW_TRACKING_URI or a local SQLite store under the working directory.
    tracking_uri: Optional[str] = None
    experiment: str = "sscq"
    registered_model: str = "sscq"
    # Retries while the tracking server is unreachable before a warning and buffering.
    max_attempts: int = 3
    # Per-request timeout of the training metrics logger (one HTTP try per attempt).
    request_timeout_s: int = 10
    # After the last step, how long the logger keeps trying to deliver metrics it buffered.
    final_flush_s: float = 120.0
    # Local folder for the PNG plots and JSON reports also logged as MLflow artifacts.
    output_dir: str = "outputs"


@dataclass
class EvalConfig:
    topk: int = 100
    # Promotion gate: mAP@gate_topk on data.queries_uri against the database.
    gate_topk: int = 100
    batch_size: int = 512
    # Demo only: when data.queries_uri holds no shards, promotion builds the gate set from
    # scikit-learn's bundled digits there. Off everywhere else: a missing gate set is an error.
    gate_from_bundled_digits: bool = False


@dataclass
class IndexConfig:
    index_type: str = "pq_fastscan"
    nlist: int = 1024
    # Lists scanned per query; 160 of 1024 keeps recall@10 >= 0.95 vs exhaustive ADC (benchmarks/index_bench.py).
    nprobe: int = 160
    # Embeddings kept (uniform random sample) to train the IVF coarse quantizer.
    ivf_train_sample: int = 100_000
    # k-means iterations for the IVF coarse quantizer (FAISS uses 10 for IVF training too).
    kmeans_iters: int = 10
    # One GPU per encoding actor (clusters with GPUs).
    use_gpu: bool = False
    # index_metrics.json: recall of the served index against exhaustive ADC over the same codes.
    metrics_queries: int = 1000
    # Above this many vectors, index_metrics.json is measured on a uniform sample of parts
    # holding at most this many (bounds the reindex driver's memory whatever the collection).
    metrics_max_rows: int = 2_000_000
    encode_batch_size: int = 512
    # Encoding actors; 0 = auto: one per GPU with use_gpu, else one per CPU less one for reads.
    encode_concurrency: int = 0
    # Auto (encode_concurrency 0) starts at most one actor per this many source bytes (0 = no
    # cap): an actor's start-up (process, torch, model load) is ~5 s on a busy core, ~7,000
    # images of encoding, which a small job never wins back (BENCHMARKS.md, "Encoding").
    encode_bytes_per_actor: int = 16 << 20
    # Index-root lock lease; a heartbeat renews it, so a dead writer's lease lapses this fast.
    lock_ttl_s: float = 120.0
    # Snapshots and part files no retained snapshot names are deleted once this much older
    # (readers that opened an older generation keep working this long; the current and
    # previous snapshots are always kept).
    gc_grace_s: float = 86400.0
    # Newest generations of the CURRENT chain that garbage collection always keeps (>= 1).
    gc_keep_generations: int = 2
    # Keys per delete request (S3 DeleteObjects takes at most 1,000).
    gc_delete_batch: int = 1000
    # Run garbage collection after each reindex (`sscq reindex --no-gc` turns it off; `sscq gc` runs it alone).
    gc_after_reindex: bool = True
    # Part entries per manifest file (a snapshot is a manifest list over such files, reused across generations).
    manifest_max_parts: int = 1000


@dataclass
class ServeConfig:
    """The search service (sscq_dist/serving). Fields marked (run time) are the Serve
    user_config: `serve deploy` of a changed value reconfigures replicas without a restart."""

    # Partitions of the snapshot (each one deployment; parts by rendezvous hashing); replicas of each give QPS.
    partitions: int = 1
    replicas_per_partition: int = 1
    ingress_replicas: int = 1
    # Ray CPUs reserved per replica (fractions allowed: a partition mostly waits on memory).
    partition_cpus: float = 1.0
    ingress_cpus: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    # Local folder for part files and the memory-mapped row-metadata (lookup) files.
    cache_dir: str = ".cache/index"
    # Bound of that folder in bytes: least recently used files go first, never those of a held
    # snapshot (replicas of one machine share the folder; each keeps the bound).
    cache_max_bytes: int = 10_000_000_000
    # (run time) Seconds between reads of CURRENT; a new snapshot serves within this plus its load time.
    watch_interval_s: float = 10.0
    # (run time) A replaced snapshot stays loaded this long after its last query (pinned requests finish).
    retain_previous_s: float = 30.0
    # (run time) k when the request gives none, and the largest k accepted.
    default_k: int = 10
    max_k: int = 100
    # (run time) IVF lists scanned per query; null = the nprobe stored in the index.
    nprobe: Optional[int] = None
    # (run time) How long the ingress waits for a partition, and how often it retries one that failed.
    partition_timeout_s: float = 10.0
    partition_retries: int = 1
    # (run time) Upload limit for a query image (bytes); decoded pixels are limited by data.max_image_pixels.
    max_upload_bytes: int = 20_000_000
    # (run time) Longest side of a /thumb image in pixels (never upscaled).
    thumb_size: int = 128
    # /thumb refuses (422) a row group whose image column chunk is larger than this instead of
    # reading it (shards written by other tools may have one huge row group).
    thumb_max_chunk_bytes: int = 64 * 1024 * 1024
    # Thumbnails (PNG bytes) and shard footers kept in memory, bounded in MB.
    thumb_cache_mb: float = 64.0
    # Serve health checks: how fast a dead replica is noticed and replaced.
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 10.0
    # A replica being stopped (swap of settings, scale-down, app deletion) first waits this
    # long for routers to stop sending to it, then until its requests finish (at most
    # graceful_shutdown_timeout_s). Ray Serve's defaults; a single machine needs less.
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    # Torch threads of an ingress replica (query encoding) and FAISS (OpenMP) threads of a
    # partition replica: one query is small, so replicas, not threads, use the cores.
    torch_threads: int = 1
    search_threads: int = 1
    # Bearer token file (a mounted Secret); the env var SSCQ_SERVE_TOKEN takes precedence. A token
    # given is always enforced; a non-loopback host without one is refused unless insecure_no_auth.
    token_file: Optional[str] = None
    insecure_no_auth: bool = False
    # (run time) Per-client token bucket: sustained requests/s and burst; beyond it 429 + Retry-After.
    rate_limit_per_s: float = 50.0
    rate_limit_burst: int = 100
    # (run time) Requests one ingress replica works on at once; more get 503 + Retry-After at once.
    max_in_flight: int = 64
    # (run time) Whole-request deadline at the ingress (504 past it); keep it above partition_timeout_s.
    request_timeout_s: float = 30.0
    # Serve's own queue in front of the ingress replicas (its proxy answers 503 when full).
    max_queued_requests: int = 128


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"model.bits": 32, ...}`: the form logged as MLflow params."""
        return _flatten(self.to_dict())

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------- loading


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Config) -> Config:
    """Range checks; each failure names its key."""
    m, t, l, d, a = cfg.model, cfg.train, cfg.loss, cfg.data, cfg.data.augment
    _check(m.bits in BITS_CHOICES, "model.bits", f"must be one of {BITS_CHOICES}, got {m.bits}")
    _check(m.backbone in BACKBONES, "model.backbone", f"must be one of {BACKBONES}, got {m.backbone!r}")
    _check(m.num_codewords == 16, "model.num_codewords", f"must be 16 (4-bit fast-scan codes), got {m.num_codewords}")
    _check(m.bits % 4 == 0, "model.bits", f"must be divisible by log2(K)=4, got {m.bits}")
    _check(m.codeword_dim > 0, "model.codeword_dim", f"must be > 0, got {m.codeword_dim}")
    _check(m.head_hidden > 0, "model.head_hidden", f"must be > 0, got {m.head_hidden}")
    _check(m.head_layers in (1, 2), "model.head_layers", f"must be 1 or 2, got {m.head_layers}")
    _check(0 < m.width <= 8, "model.width", f"must be in (0, 8], got {m.width}")
    for name in ("tau_q",):
        _check(getattr(m, name) > 0, f"model.{name}", f"temperature must be > 0, got {getattr(m, name)}")
    for name in ("tau_ic", "tau_cc", "tau_pn", "tau_cd"):
        _check(getattr(l, name) > 0, f"loss.{name}", f"temperature must be > 0, got {getattr(l, name)}")
    for name in ("w_icf", "w_icz", "w_cc", "w_pn", "w_cd"):
        _check(getattr(l, name) >= 0, f"loss.{name}", f"weight must be >= 0, got {getattr(l, name)}")
    _check(l.num_neighbors >= 1, "loss.num_neighbors", f"must be >= 1, got {l.num_neighbors}")
    _check(0.0 <= l.debias_tau_plus < 1.0, "loss.debias_tau_plus", f"must be in [0, 1), got {l.debias_tau_plus}")
    _check(l.fn_cancel_k >= 0, "loss.fn_cancel_k", f"must be >= 0, got {l.fn_cancel_k}")
    _check(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _check(d.channels in (1, 3), "data.channels", f"must be 1 or 3, got {d.channels}")
    _check(d.decode_batch_size >= 1, "data.decode_batch_size", f"must be >= 1, got {d.decode_batch_size}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {d.shuffle_buffer}")
    _check(d.cache_max_rows >= 0, "data.cache_max_rows", f"must be >= 0, got {d.cache_max_rows}")
    _check(0.0 <= d.max_drop_fraction <= 1.0, "data.max_drop_fraction",
           f"must be in [0, 1], got {d.max_drop_fraction}")
    _check(d.prefetch_batches >= 0, "data.prefetch_batches", f"must be >= 0, got {d.prefetch_batches}")
    _check(d.max_image_pixels >= 64, "data.max_image_pixels", f"must be >= 64, got {d.max_image_pixels}")
    for name in ("row_group_rows", "row_group_bytes"):
        _check(getattr(d, name) >= 1, f"data.{name}", f"must be >= 1, got {getattr(d, name)}")
    for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "erase_p"):
        v = getattr(a, name)
        _check(0.0 <= v <= 1.0, f"data.augment.{name}", f"probability must be in [0, 1], got {v}")
    _check(0 < a.crop_scale_min <= a.crop_scale_max <= 1.0, "data.augment.crop_scale_min",
           "need 0 < crop_scale_min <= crop_scale_max <= 1")
    _check(0 < a.crop_ratio_min <= a.crop_ratio_max, "data.augment.crop_ratio_min",
           "need 0 < crop_ratio_min <= crop_ratio_max")
    _check(0 < a.blur_sigma_min <= a.blur_sigma_max, "data.augment.blur_sigma_min",
           "need 0 < blur_sigma_min <= blur_sigma_max")
    _check(0.0 <= a.rotate_deg <= 180.0, "data.augment.rotate_deg", f"must be in [0, 180], got {a.rotate_deg}")
    _check(0 < a.erase_scale_min <= a.erase_scale_max < 1.0, "data.augment.erase_scale_min",
           "need 0 < erase_scale_min <= erase_scale_max < 1")
    _check(t.num_workers >= 1, "train.num_workers", f"must be >= 1, got {t.num_workers}")
    _check(t.global_batch_size >= 2 * t.num_workers, "train.global_batch_size",
           f"must be >= 2 per worker, got {t.global_batch_size} for {t.num_workers} workers")
    _check(t.global_batch_size % t.num_workers == 0, "train.global_batch_size",
           f"must be divisible by train.num_workers={t.num_workers}, got {t.global_batch_size}")
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {t.warmup_epochs}")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    _check(not (t.channels_last and t.zero_stage), "train.channels_last",
           f"true needs train.zero_stage=0: ZeRO {t.zero_stage} keeps the weights in flat buffers in the default layout")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _check(t.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {t.cpus_per_worker}")
    _check(t.max_failures >= -1, "train.max_failures", f"must be >= -1, got {t.max_failures}")
    _check(t.checkpoint_every_epochs >= 1, "train.checkpoint_every_epochs",
           f"must be >= 1, got {t.checkpoint_every_epochs}")
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
           f"must be >= 0 (0 = off), got {t.checkpoint_every_steps}")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", f"must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    _check(t.log_every_steps >= 1, "train.log_every_steps", f"must be >= 1, got {t.log_every_steps}")
    _check(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", f"must be >= 0, got {t.max_steps_per_epoch}")
    _check(math.isfinite(t.time_budget_minutes) and t.time_budget_minutes >= 0, "train.time_budget_minutes",
           f"must be >= 0 (0 = off), got {t.time_budget_minutes}")
    b = cfg.bank
    _check(b.size >= 1, "bank.size", f"must be >= 1, got {b.size}")
    _check(b.size % t.num_workers == 0, "bank.size",
           f"must be divisible by train.num_workers={t.num_workers}, got {b.size}")
    _check(b.warmup_epochs >= 0, "bank.warmup_epochs", f"must be >= 0, got {b.warmup_epochs}")
    _check(cfg.tracking.max_attempts >= 1, "tracking.max_attempts", f"must be >= 1, got {cfg.tracking.max_attempts}")
    _check(cfg.tracking.request_timeout_s >= 1, "tracking.request_timeout_s",
           f"must be >= 1, got {cfg.tracking.request_timeout_s}")
    _check(cfg.tracking.final_flush_s >= 0, "tracking.final_flush_s", f"must be >= 0, got {cfg.tracking.final_flush_s}")
    _check(cfg.eval.topk >= 1, "eval.topk", f"must be >= 1, got {cfg.eval.topk}")
    _check(cfg.eval.gate_topk >= 1, "eval.gate_topk", f"must be >= 1, got {cfg.eval.gate_topk}")
    ix = cfg.index
    _check(ix.index_type in INDEX_TYPES, "index.index_type", f"must be one of {INDEX_TYPES}, got {ix.index_type!r}")
    _check(ix.nlist >= 1, "index.nlist", f"must be >= 1, got {ix.nlist}")
    _check(1 <= ix.nprobe, "index.nprobe", f"must be >= 1, got {ix.nprobe}")
    _check(ix.metrics_queries >= 1, "index.metrics_queries", f"must be >= 1, got {ix.metrics_queries}")
    _check(ix.kmeans_iters >= 1, "index.kmeans_iters", f"must be >= 1, got {ix.kmeans_iters}")
    _check(ix.ivf_train_sample >= ix.nlist, "index.ivf_train_sample",
           f"must be >= index.nlist={ix.nlist} (k-means needs a sample row per list), got {ix.ivf_train_sample}")
    _check(ix.encode_batch_size >= 1, "index.encode_batch_size", f"must be >= 1, got {ix.encode_batch_size}")
    _check(ix.encode_concurrency >= 0, "index.encode_concurrency", f"must be >= 0 (0 = auto), got {ix.encode_concurrency}")
    _check(ix.encode_bytes_per_actor >= 0, "index.encode_bytes_per_actor",
           f"must be >= 0 (0 = no cap), got {ix.encode_bytes_per_actor}")
    _check(ix.lock_ttl_s > 0, "index.lock_ttl_s", f"must be > 0, got {ix.lock_ttl_s}")
    _check(ix.gc_grace_s >= 0, "index.gc_grace_s", f"must be >= 0, got {ix.gc_grace_s}")
    _check(ix.gc_keep_generations >= 1, "index.gc_keep_generations", f"must be >= 1, got {ix.gc_keep_generations}")
    _check(1 <= ix.gc_delete_batch <= 1000, "index.gc_delete_batch",
           f"must be in [1, 1000] (S3 DeleteObjects limit), got {ix.gc_delete_batch}")
    _check(ix.manifest_max_parts >= 1, "index.manifest_max_parts", f"must be >= 1, got {ix.manifest_max_parts}")
    st = cfg.storage
    _check(st.max_attempts >= 1, "storage.max_attempts", f"must be >= 1, got {st.max_attempts}")
    _check(st.retry_backoff_s >= 0, "storage.retry_backoff_s", f"must be >= 0, got {st.retry_backoff_s}")
    for name in ("connect_timeout_s", "read_timeout_s", "deadline_s"):
        _check(getattr(st, name) > 0, f"storage.{name}", f"must be > 0, got {getattr(st, name)}")
    validate_serve(cfg.serve)
    return cfg


def validate_serve(sv: ServeConfig) -> ServeConfig:
    """Range checks of the serve section (also run on every run-time reconfigure)."""
    for name in ("partitions", "replicas_per_partition", "ingress_replicas", "default_k", "max_k", "thumb_size",
                 "max_upload_bytes", "torch_threads", "search_threads", "rate_limit_burst", "max_in_flight",
                 "max_queued_requests"):
        _check(getattr(sv, name) >= 1, f"serve.{name}", f"must be >= 1, got {getattr(sv, name)}")
    _check(sv.default_k <= sv.max_k, "serve.default_k", f"must be <= serve.max_k={sv.max_k}, got {sv.default_k}")
    for name in ("partition_cpus", "ingress_cpus", "watch_interval_s", "partition_timeout_s", "health_check_period_s",
                 "health_check_timeout_s", "rate_limit_per_s", "request_timeout_s"):
        _check(getattr(sv, name) > 0, f"serve.{name}", f"must be > 0, got {getattr(sv, name)}")
    for name in ("graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s"):
        _check(getattr(sv, name) >= 0, f"serve.{name}", f"must be >= 0, got {getattr(sv, name)}")
    _check(sv.retain_previous_s >= 0, "serve.retain_previous_s", f"must be >= 0, got {sv.retain_previous_s}")
    _check(sv.thumb_max_chunk_bytes >= 1, "serve.thumb_max_chunk_bytes", f"must be >= 1, got {sv.thumb_max_chunk_bytes}")
    _check(sv.thumb_cache_mb >= 0, "serve.thumb_cache_mb", f"must be >= 0, got {sv.thumb_cache_mb}")
    _check(sv.cache_max_bytes >= 0, "serve.cache_max_bytes", f"must be >= 0, got {sv.cache_max_bytes}")
    _check(sv.partition_retries >= 0, "serve.partition_retries", f"must be >= 0, got {sv.partition_retries}")
    _check(sv.nprobe is None or sv.nprobe >= 1, "serve.nprobe", f"must be >= 1 or null, got {sv.nprobe}")
    _check(1 <= sv.port <= 65535, "serve.port", f"must be a TCP port, got {sv.port}")
    return sv


_EXP_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    # YAML scalars: 32 -> int, 0.5 -> float, true -> bool, null -> None, else string.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _EXP_FLOAT.match(value):
        value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string; on a command line it is a number
    return key, value


def _set_nested(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a plain mapping plus `key.sub=value` overrides."""
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_nested(data, key, value)
    return validate(build_record(Config, data, lambda msg: ConfigError(f"config {msg}"), strict=True))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or the defaults when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: invalid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return from_dict(data, overrides)
