"""The node's settings: one typed tree read from `RESULTITY_*` environment variables.

Secrets are never values here: the node key is read from the file `key_file` names.
"""

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.limits import MODEL_ID_PATTERN
from schemas.result import NETWORK_PATTERN
from worker.core.signing import parse_public_key

DEFAULT_HOME = Path.home() / ".resultity"
GPU_UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]{8,64}")
DEFAULT_NETWORK = "devnet"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESULTITY_", extra="ignore", frozen=True)

    # network
    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    nats_creds: Path | None = Field(
        None, description="NATS credentials file (`.creds`: user JWT and nkey seed) to connect with"
    )
    nats_nkey_seed_file: Path | None = Field(
        None,
        description="file holding this participant's NATS nkey user seed (`SU...`, mode 0600), "
        "when the network gave an nkey rather than a `.creds` file",
    )
    nats_ca: Path | None = Field(
        None,
        description="CA certificate (PEM) that the NATS servers' TLS certificates must chain to",
    )
    nats_insecure: bool = Field(
        False,
        description="let the node connect over a plaintext `nats://` URL (development only)",
    )
    admission_required: bool = Field(
        True,
        description="a node serves only while the node registry admits it, and clients and the "
        "gateway accept results, stream messages and error events only from admitted nodes",
    )
    network: str = Field(
        DEFAULT_NETWORK,
        pattern=NETWORK_PATTERN,
        description="the network this node belongs to; snapshots for another are refused",
    )
    subject_prefix: str = Field(
        "rst",
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="prefix of every subject, stream and bucket",
    )
    authority_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="hex Ed25519 public keys trusted to sign config snapshots, comma-separated"
    )
    provision: bool = Field(True, description="create streams and consumers at start if missing")
    stream_replicas: int = Field(1, ge=1, le=5, description="replicas of streams the node creates")
    ack_wait_s: float = Field(
        30.0, gt=0, description="seconds before an unacked job is redelivered"
    )
    max_deliver: int = Field(5, ge=1, description="deliveries of a job before it is dropped")
    duplicate_window_s: float = Field(
        120.0, gt=0, description="stream window that dedupes by Nats-Msg-Id"
    )
    models_bucket: str = Field(
        "rst_models", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="object store bucket of models"
    )

    # identity and local state
    key_file: Path = Field(
        DEFAULT_HOME / "node.key", description="node key file (Ed25519 seed, mode 0600)"
    )
    cache_dir: Path = Field(DEFAULT_HOME / "cache", description="verified model cache")
    state_dir: Path = Field(
        DEFAULT_HOME / "state", description="snapshot in force and version floor"
    )
    model_unpack_ratio: float = Field(
        4.0,
        ge=1,
        description="a model archive may unpack to this many times its size (at least 16 MiB)",
    )
    model_max_entries: int = Field(10_000, ge=1, description="entries a model archive may hold")
    model_fetch_min_bytes_per_s: float = Field(
        1_000_000.0,
        gt=0,
        description="slowest model download accepted: the deadline is the grace plus size "
        "over this rate",
    )
    model_fetch_grace_s: float = Field(
        120.0, gt=0, description="time a model download gets on top of its size over the rate"
    )

    # serving
    model: str | None = Field(
        None,
        pattern=MODEL_ID_PATTERN,
        description="serve only this model id (a loadout of one; RESULTITY_MODELS takes a list)",
    )
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="the node's loadout: model ids it may serve, comma-separated; unset: every "
        "approved model that fits the cache budget",
    )
    cache_budget_bytes: int = Field(
        0,
        ge=0,
        description="bytes of model files the cache may hold; 0: the cache disk's free space "
        "plus what the cache holds",
    )
    switch_min_residency_s: float = Field(
        30.0,
        ge=0,
        description="least time a model stays loaded before the node switches to another on demand",
    )
    switch_check_interval_s: float = Field(
        2.0, gt=0, description="seconds between looks at the queues of the loadout's models"
    )
    max_in_flight: int = Field(256, ge=1, description="jobs fetched but not yet acked, at most")
    runtime_max_active: int = Field(
        0,
        ge=0,
        description="requests the runtime runs at once, at most; 0: what the engine reports "
        "it can run concurrently",
    )
    max_job_bytes: int = Field(1 << 20, ge=1024, description="largest job message accepted")
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="time to finish jobs in flight on shutdown"
    )
    switch_grace_s: float = Field(
        30.0,
        ge=0,
        description="when a snapshot changes what runs: time the jobs in flight get to finish "
        "on the old runtime before the rest is handed back (a revoked model gets none)",
    )
    heartbeat_interval_s: float = Field(5.0, gt=0, description="seconds between heartbeats")
    apply_retry_s: float = Field(
        5.0,
        gt=0,
        description="first delay before a failed snapshot apply is retried (doubles, to 10 min)",
    )
    validation_interval_s: float = Field(
        3600.0, gt=0, description="seconds between reruns of validation vectors"
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="port of the metrics endpoint; unset: off"
    )
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds")

    # runtime
    runtime_backend: Literal["docker", "process"] = Field(
        "docker", description="run the runtime in a container, or as a local process (dev)"
    )
    gpus: str = Field(
        "",
        description="GPUs passed to the runtime container: unset none, `all`, or "
        "comma-separated indices or UUIDs (`0,1`, `GPU-...`); `true` means `all`",
    )
    runtime_gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each GPU's memory vLLM may take (GPU nodes)"
    )
    runtime_memory: str = Field("8g", description="memory limit of the runtime container")
    runtime_pids: int = Field(512, ge=16, description="process limit of the runtime container")
    runtime_shm: str = Field("512m", description="shared memory size of the runtime container")
    runtime_jit_cache: str = Field(
        "2g",
        description="size of the runtime's compile cache: the one mount where it may write "
        "code it loads (Triton, TorchInductor and vLLM kernels); /tmp stays noexec",
    )
    runtime_cpus: float = Field(
        0.0, ge=0, description="CPU limit of the runtime container; 0: every CPU of the host"
    )
    runtime_user: str = Field("65534:65534", description="uid:gid the runtime runs as")
    runtime_ready_timeout_s: float = Field(
        300.0, gt=0, description="how long the runtime may take to send `ready`"
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description=(
            "how long one request may run: past it, if the runtime still answers a ping,"
            " that request alone is aborted (DEADLINE_EXCEEDED)"
        ),
    )
    runtime_write_timeout_s: float = Field(
        10.0, gt=0, description="how long the runtime may take to accept one input frame"
    )
    ping_interval_s: float = Field(10.0, gt=0, description="seconds between runtime pings")
    ping_timeout_s: float = Field(10.0, gt=0, description="how long a ping may go unanswered")
    runtime_stop_timeout_s: float = Field(
        5.0, ge=0, description="how long a runtime may take to exit after `shutdown`"
    )
    runtime_max_frame_bytes: int = Field(8 << 20, ge=1024, description="largest runtime frame")

    # gateway (OpenAI-compatible HTTP front door of the network, `resultity-node gateway`)
    gateway_host: str = Field("127.0.0.1", description="address the gateway binds")
    gateway_port: int = Field(8000, ge=0, le=65535, description="port the gateway listens on")
    gateway_max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body the gateway accepts"
    )
    gateway_max_concurrent: int = Field(
        64, ge=1, description="requests the gateway serves at once; more get 429"
    )
    gateway_timeout_s: float = Field(
        120.0, gt=0, description="deadline of a gateway request (and of its job)"
    )
    gateway_body_timeout_s: float = Field(
        10.0, gt=0, description="time a client has to send its whole request body; then 408"
    )
    gateway_api_keys_file: Path | None = Field(
        None,
        description="file of the API keys the gateway accepts (`Authorization: Bearer`), one a "
        "line; the gateway does not start without one",
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, value: object) -> object:
        """Canonical: "" (none), "all", or the chosen ids joined by commas."""
        if isinstance(value, bool):
            return "all" if value else ""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.lower() in ("", "false", "none"):
            return ""
        if text.lower() in ("all", "true"):
            return "all"
        ids = [part.strip() for part in text.split(",") if part.strip()]
        for gpu in ids:
            if not (gpu.isdigit() or GPU_UUID.fullmatch(gpu)):
                raise ValueError(f"{gpu!r} is neither a GPU index nor a GPU/MIG UUID")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a GPU is named twice in {text!r}")
        return ",".join(ids)

    def gpu_ids(self) -> tuple[str, ...] | None:
        """The chosen GPUs: None for none, () for all, else their indices or UUIDs."""
        if not self.gpus:
            return None
        return () if self.gpus == "all" else tuple(self.gpus.split(","))

    @field_validator("authority_keys", "models", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("authority_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for key in value:
            parse_public_key(key)
        return tuple(k.lower() for k in value)

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for model_id in value:
            if not re.fullmatch(MODEL_ID_PATTERN, model_id):
                raise ValueError(f"model id {model_id!r} does not match {MODEL_ID_PATTERN}")
        return value

    def authority_key_bytes(self) -> frozenset[bytes]:
        return frozenset(parse_public_key(k) for k in self.authority_keys)

    def subject(self, *tokens: str) -> str:
        return ".".join((self.subject_prefix, *tokens))

    def stream(self, name: str) -> str:
        return f"{self.subject_prefix.upper()}_{name}"
