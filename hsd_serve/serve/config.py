"""Typed configuration of the service: models, method defaults and per-deployment scaling.

``AppConfig`` is what ``serve_config.yaml`` passes as ``args`` to ``hsd_serve.serve.app:build_app``.
Unknown keys are errors (Ray's own schema accepts unknown keys silently; ours does not).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hsd_serve.engine.types import RequestLimits
from hsd_serve.zoo import BUNDLED_PREFIX, resolve_model_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """A model to load: a local directory, a hub id, or ``bundled:<name>`` (this package's zoo)."""

    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    # drafters only: output head over the first N token ids (+ specials); 0 = full vocabulary
    head_ids: int = Field(0, ge=0)
    # drafters only: run Llama/Mistral/Qwen2 forwards in plain torch (models.plain: the same
    # weights and cache, several times less Python per forward on CPU); other architectures
    # keep transformers' forward.  None: on for drafters.  Targets always run transformers'
    # own forward (the HF executor is the reference)
    plain_forward: Optional[bool] = None

    def resolved_path(self) -> str:
        """The path on this node (bundled models live inside the installed package)."""
        return resolve_model_path(self.path)

    def spec(self, *, drafter: bool = False):
        """The ``ModelSpec`` to load (``drafter``: this model drafts, ``plain_forward`` applies)."""
        from hsd_serve.models.hf import ModelSpec

        plain = drafter and (self.plain_forward is None or self.plain_forward)
        return ModelSpec(self.resolved_path(), dtype=self.dtype, device=self.device,
                         trust_remote_code=self.trust_remote_code, head_ids=self.head_ids,
                         plain_forward=plain)


class VllmEngineOptions(_Strict):
    """How a replica builds a vLLM engine for its model."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    enforce_eager: bool = False  # True: starts in ~15 s instead of ~60 s on CPU, slower steps
    max_num_seqs: int = Field(64, ge=1)
    max_model_len: Optional[int] = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    cpu_kvcache_gib: int = Field(2, ge=1)  # CPU nodes: VLLM_CPU_KVCACHE_SPACE
    cpu_threads_bind: str = "auto"  # CPU nodes: VLLM_CPU_OMP_THREADS_BIND; auto: the replica's cores
    engine_args: dict[str, Any] = Field(default_factory=dict)  # more vLLM engine args, as given


class VllmDrafterOptions(VllmEngineOptions):
    """How a drafter replica builds its vLLM engine (``drafter_executor: vllm``)."""

    cpu_kvcache_gib: int = Field(1, ge=1)  # a drafter's cache is small


class VllmOptions(VllmEngineOptions):
    """How a target replica builds its vLLM engine (``target_executor: vllm``)."""

    num_speculative_tokens: int = Field(4, ge=0, le=64)  # most drafts per step (0: no drafts)
    # CPU nodes: run vLLM's engine-core process on those cores too (it busy-polls the worker; next
    # to it, it stops taking a core from the drafter and the front end)
    cpu_pin_engine_core: bool = True
    draft_wait_s: float = Field(0.2, gt=0)  # longest a step waits for drafts, then decodes plainly
    # engine steps with more running requests than this decode plainly (no draft calls): where
    # the batch is large the target's forward is busy enough that drafts cost more than they
    # save (measured on a 2-core CPU: through the service, drafting lost to plain decoding
    # from 2 requests on, bench/README.md); raise it where drafters have hardware of their own
    draft_max_batch: int = Field(1, ge=1)
    # sampled requests take drafts too (vLLM's rejection rule is exact for drafts that do not
    # depend on the target's randomness; on CPU with our fix of its sampler, docs/vllm.md);
    # false: they decode plainly
    sampled_drafts: bool = True
    # the drafter drafts ahead while the target verifies (the next draft assumes this one is
    # accepted and guesses the bonus token; a miss drops it): docs/vllm.md "Overlap".  Off by
    # default: it pays only where drafting has hardware to itself (measured on a 2-core CPU: no
    # gain in-process, slower through the service, bench/README.md)
    overlap: bool = False
    # ... only in engine steps with at most this many requests: under load the drafters have no
    # spare time, and drafted-ahead ids that get dropped would delay the drafts every step needs
    overlap_max_batch: int = Field(2, ge=1)
    # ... and a step whose draft is not ready: "plain" decodes plainly (or verifies the part
    # drafted so far) while the drafter drafts on, "wait" waits for the draft (docs/vllm.md)
    overlap_miss: Literal["plain", "wait"] = "plain"
    # serve vLLM's own Prometheus metrics (vllm:*) from each target replica on this port
    # (0: any free port, reported in the replica's stats; None: not served)
    metrics_port: Optional[int] = Field(None, ge=0, le=65535)


class _TlsFiles(_Strict):
    cert_file: str  # PEM certificate chain
    key_file: str  # PEM private key
    ca_file: Optional[str] = None  # PEM CA that signed the peers' certificates (None: system roots)
    require_client_cert: bool = False  # mTLS: refuse callers without a certificate from ca_file

    @model_validator(mode="after")
    def _mtls(self) -> "_TlsFiles":
        if self.require_client_cert and not self.ca_file:
            raise ValueError("require_client_cert needs ca_file (the CA that signed the "
                             "clients' certificates)")
        return self


class TlsConfig(_TlsFiles):
    """TLS for the data plane (files on every node, e.g. a mounted Secret).  One certificate for
    the cluster: replicas present it as servers and, with ``require_client_cert``, callers (the
    coordinator, vLLM target replicas) present it as clients (mTLS)."""

    # the name the servers' certificate carries; replicas are dialled by IP, so a cluster
    # certificate issued for one DNS name (e.g. "hsd-dataplane") needs it here
    server_name: Optional[str] = None


class ClientGrpcTls(_TlsFiles):
    """``hsd.v1.Generation`` over TLS (and mTLS) for clients, served by each coordinator replica
    on ``host:port`` (Ray Serve's own gRPC proxy serves plaintext only); the same API keys,
    request limits and errors as the proxy's port."""

    host: str = "0.0.0.0"
    port: int = Field(9443, ge=1, le=65535)


class SecurityConfig(_Strict):
    """Who may call the service (docs/security.md).  Keys are never in the config itself: it
    names where they are, on the coordinator's nodes."""

    # client API keys (``Authorization: Bearer <key>`` on HTTP, ``authorization`` metadata on
    # gRPC): comma- or whitespace-separated in this environment variable, and/or one per line in
    # ``api_keys_file`` (re-read when it changes).  No key anywhere: the APIs are open (logged
    # loudly when they listen beyond loopback).  A configured file that is missing, unreadable
    # or empty stops the coordinator from starting: it never falls open.
    api_keys_env: Optional[str] = "HSD_API_KEYS"
    api_keys_file: Optional[str] = None
    metrics_requires_key: bool = True  # with keys on, GET /metrics needs one too
    # the data plane's shared token: this variable where the app is built (``serve run``, the
    # Serve controller) when set, otherwise a random token made once per Ray cluster; handed to
    # the replicas through the deployments, never through requests
    dataplane_token_env: str = "HSD_DATAPLANE_TOKEN"
    dataplane_tls: Optional[TlsConfig] = None
    # clients' gRPC over TLS on a port of its own, served by the coordinator replicas
    client_grpc_tls: Optional[ClientGrpcTls] = None
    # clients' gRPC in plaintext on 127.0.0.1:PORT, served by the coordinator replicas: what a
    # local `hsd-serve serve` uses instead of Ray Serve's gRPC proxy, which cannot bind loopback
    client_grpc_local_port: Optional[int] = Field(None, ge=1, le=65535)


class AutoscalingConfig(_Strict):
    """Ray Serve's replica autoscaling for one deployment (docs/autoscaling.md).  The signal is
    ongoing requests per replica; for Drafter and Target replicas those are open leases, one per
    request being served there.  Only the drafter may scale to zero (requests then run
    target-only at once and draft once a replica is up)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    downscale_to_zero_delay_s: Optional[float] = Field(None, ge=0)  # None: downscale_delay_s
    metrics_interval_s: float = Field(10.0, gt=0)  # how often the controller decides
    look_back_period_s: float = Field(30.0, gt=0)  # the window ongoing requests are averaged over

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas "
                             f"({self.min_replicas})")
        if self.initial_replicas is not None and not \
                self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self


class DeploymentOptions(_Strict):
    """Scaling, backpressure and placement of one deployment."""

    num_replicas: Optional[int] = Field(1, ge=1)
    autoscaling_config: Optional[AutoscalingConfig] = None
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # -1 = unbounded (not recommended)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)  # e.g. {"target_node": 1}
    torch_threads: Optional[int] = Field(None, ge=1)  # None: Ray's OMP_NUM_THREADS

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v == 0:  # Ray Serve refuses 0 at deploy time; say so when the config is read
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1")
        return v

    def serve_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  "resources": dict(self.resources)},
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class AppConfig(_Strict):
    """Everything ``build_app`` needs."""

    target: ModelConfig = ModelConfig(path=BUNDLED_PREFIX + "target")
    drafter: Optional[ModelConfig] = ModelConfig(path=BUNDLED_PREFIX + "drafter")
    model_name: str = "hsd-bundled"
    # what executes the target: "hf" (our reference executor: every method, the data-plane
    # Verify protocol) or "vllm" (vLLM's engine; drafts from the Drafter deployment, verified
    # inside vLLM: greedy with any drafting method, see docs/vllm.md)
    target_executor: Literal["hf", "vllm"] = "hf"
    vllm: VllmOptions = VllmOptions()
    # what executes the drafter: "hf" (every method; measured faster per drafted token on CPU,
    # bench/README.md) or "vllm" (its forwards in an in-process vLLM engine: slem, and tli/sd
    # when greedy — the methods whose drafts are argmaxes; docs/vllm.md "Drafter on vLLM")
    drafter_executor: Literal["hf", "vllm"] = "hf"
    # HF executor: the drafter drafts the next round while the target verifies this one
    # (docs/overlap.md; the vLLM executor's switch is vllm.overlap).  Off by default: it pays
    # where the drafter has hardware of its own (measured on a 2-core CPU with the target on a
    # core of its own: 1.11-1.19x at one stream with overlap_miss plain; bench/README.md)
    overlap: bool = False
    # ... only for requests whose last verification ran in a batch of at most this many (under
    # load the drafter has no idle time, and dropped drafted-ahead tokens delay fresh drafts)
    overlap_max_batch: int = Field(2, ge=1)
    # ... and a round with no usable draft made ahead: "plain" is the target's plain step while
    # the drafter drafts ahead from the committed tokens (the target never waits for a draft),
    # "wait" asks for a fresh draft and verifies it (docs/overlap.md)
    overlap_miss: Literal["plain", "wait"] = "plain"
    # ... and each draft made ahead also drafts up to this many other paths, from the drafter's
    # runner-up tokens where the target may reject a candidate (SLEM).  0 (one path) by default:
    # on a 2-core CPU, where the drafter shares its core, they cost more drafter time than the
    # rounds they save (docs/overlap.md, "Branches"); for drafters with spare batch width
    overlap_branches: int = Field(0, ge=0, le=16)
    drafter_vllm: VllmDrafterOptions = VllmDrafterOptions()
    # request limits and defaults, checked as one RequestLimits (request_limits())
    default_method: str = "auto"
    default_lookahead: int = 4
    default_max_tokens: int = 128  # over max_tokens_limit: max_tokens_limit
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 1_000_000
    proposal_top_m: int = Field(64, ge=0)
    draft_timeout_s: Optional[float] = Field(5.0, gt=0)  # per drafter call; then target-only
    verify_timeout_s: Optional[float] = Field(120.0, gt=0)  # per target call, then fail over
    target_failover_s: float = Field(60.0, ge=0)  # resume on another target replica this long
    drafter_retry_rounds: int = Field(8, ge=1)
    load_aware_lookahead: bool = True  # shrink k when the target batches many requests
    max_batch: int = Field(16, ge=1)  # requests per batched target forward
    slrs_max_forwards: int = Field(64, ge=1)
    slrs_max_target_bytes: Optional[int] = Field(8, ge=1)
    max_sessions_per_replica: int = Field(256, ge=1)
    # tokens in all KV caches of one replica; over it, least recently used sessions are evicted
    # and rebuilt on their next round (None: only max_sessions_per_replica bounds the caches)
    max_cached_tokens_per_replica: Optional[int] = Field(None, ge=1)
    lease_timeout_s: float = Field(30.0, gt=0)  # wait this long for a replica lease, then fail
    # a request's first drafter call waits this long for its drafter lease, then its rounds go on
    # target-only while the lease goes on in the background (a drafter deployment scaled to zero
    # serves requests at once; drafting starts when a replica is up)
    drafter_lease_wait_s: float = Field(0.5, gt=0)
    security: SecurityConfig = SecurityConfig()
    drafter_deployment: DeploymentOptions = DeploymentOptions(resources={})
    target_deployment: DeploymentOptions = DeploymentOptions(resources={})
    coordinator_deployment: DeploymentOptions = DeploymentOptions(num_cpus=0.25,
                                                                  max_ongoing_requests=64,
                                                                  max_queued_requests=128)

    @field_validator("target_deployment", "coordinator_deployment")
    @classmethod
    def _not_to_zero(cls, v: DeploymentOptions, info) -> DeploymentOptions:
        if v.autoscaling_config is not None and v.autoscaling_config.min_replicas < 1:
            raise ValueError(f"{info.field_name}.autoscaling_config.min_replicas must be >= 1: "
                             "only the drafter may scale to zero (a request needs a target "
                             "and a coordinator at once)")
        return v

    @field_validator("target")
    @classmethod
    def _target_head(cls, v: ModelConfig) -> ModelConfig:
        if v.head_ids:
            raise ValueError("head_ids prunes a drafter's output head; the target's distribution "
                             "must stay whole (lossless), so target.head_ids must be 0")
        if v.plain_forward:
            raise ValueError("plain_forward is for drafters; the target runs transformers' own "
                             "forward (the reference), so target.plain_forward must not be true")
        return v

    @model_validator(mode="after")
    def _overlap_switch(self) -> "AppConfig":
        if self.overlap and self.target_executor == "vllm":
            raise ValueError("overlap drafts ahead on the hf target executor; with "
                             "target_executor: vllm set vllm.overlap")
        return self

    @model_validator(mode="after")
    def _drafter_on_vllm(self) -> "AppConfig":
        if self.drafter_executor == "vllm" and self.drafter is not None and self.drafter.head_ids:
            raise ValueError("drafter.head_ids prunes the HF drafter's output head; with "
                             "drafter_executor: vllm leave it 0")
        return self

    @model_validator(mode="after")
    def _limits(self) -> "AppConfig":
        self.request_limits()  # raises ValueError for limits that do not hold together
        return self

    def request_limits(self) -> RequestLimits:
        """The limits and defaults the service applies to every request, at both front doors."""
        return RequestLimits(max_prompt_chars=self.max_prompt_chars,
                             max_tokens_limit=self.max_tokens_limit,
                             default_max_tokens=min(self.default_max_tokens, self.max_tokens_limit),
                             default_lookahead=self.default_lookahead,
                             default_method=self.default_method, allow_empty_prompt=False)


def service_limits(**fields: Any) -> RequestLimits:
    """The service's request limits: ``AppConfig``'s limit fields, its defaults unless given."""
    return AppConfig(**fields).request_limits()


def load_config(args: Union[dict, AppConfig, None]) -> AppConfig:
    if isinstance(args, AppConfig):
        return args
    return AppConfig.model_validate(args or {})
