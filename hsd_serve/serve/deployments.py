"""Ray Serve deployments: Drafter and Target replicas (a grpc.aio data-plane server each) and the
Coordinator (client-facing gRPC ``Generation`` + OpenAI-compatible HTTP, runs the round loop).

Control plane: for every request the coordinator opens a *lease* on one drafter and one target
replica through their DeploymentHandles — a streaming call that yields the replica's gRPC address
and stays open until the request ends.  Ray Serve therefore routes, balances, counts ongoing
requests for autoscaling and applies ``max_ongoing_requests``/``max_queued_requests``
backpressure; closing the lease frees the request's caches on the replica.  Data plane: the
rounds go straight to those addresses over gRPC (DESIGN.md §5: ~0.5 ms per call vs ~2.7 ms per
handle call).  Replica caches are caches: the coordinator's committed tokens are the truth.

Security (docs/security.md): the data-plane servers refuse calls without the cluster's token
(``DataPlaneSecurity``, made by ``build_deployments`` and handed to every deployment as an
argument); the coordinator checks client API keys at both front doors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import AsyncIterator, Optional

from ray import serve

from hsd_serve.serve.config import AppConfig, load_config
from hsd_serve.serve.lease import (DrafterAvailability, LeasedDrafter, LeasedTarget,
                                   UnavailableDrafter)
from hsd_serve.serve.security import DataPlaneSecurity

log = logging.getLogger("hsd_serve.serve")

LEASE_CALLER_CHECK_S = 5.0  # how often a replica checks that a lease holder is still alive


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


class _ModelReplica:
    """Shared by Drafter and Target: load, start the data-plane server, hand out leases."""

    kind = "?"

    def __init__(self, dataplane: Optional[DataPlaneSecurity] = None) -> None:
        self.dataplane = dataplane  # the token (and TLS) its data-plane server demands
        self.worker = None  # the DrafterWorker / TargetWorker, set by ``_start``
        self.server = None  # the grpc.aio data-plane server
        self.servicer = None  # its servicer: runs calls on the worker's own thread
        self.address: Optional[str] = None  # "host:port" of the data plane
        self.gauges = None
        self.leases_total = 0
        self.active_leases: dict[str, int] = {}  # rid -> open leases (a re-lease may overlap)
        self.caller_watchers: dict[str, asyncio.Task] = {}  # caller actor id -> its watcher

    async def _start(self, worker, **servicer_options) -> None:
        import ray

        from hsd_serve.serve.dataplane import start_dataplane_server

        self.worker = worker
        self.server, port = await start_dataplane_server(self.kind, worker,
                                                         servicer_options=servicer_options,
                                                         security=self.dataplane)
        self.servicer = self.server.hsd_servicer  # runs calls on the worker's own thread
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        log.info("%s replica serving its data plane on %s", self.kind, self.address)
        from hsd_serve.metrics import RaySink, ReplicaGauges

        self.gauges = ReplicaGauges(  # hsd_ongoing_requests / hsd_cache_sessions of this replica
            RaySink(), self.kind,
            ongoing=lambda: sum(self.active_leases.values()),
            sessions=lambda: len(self.worker.sessions)).start()

    async def lease(self, rid: str, caller=None) -> AsyncIterator[str]:
        """Yield this replica's gRPC address; hold the lease until the caller closes it, then
        free the request's caches here.  ``caller`` (the coordinator replica's actor handle) is
        watched: Ray does not cancel a dead caller's calls, so a lease whose coordinator died
        ends by itself within ``LEASE_CALLER_CHECK_S`` and frees its caches and its slot."""
        self.leases_total += 1
        active = self.active_leases
        active[rid] = active.get(rid, 0) + 1
        try:
            self.servicer.begin(rid)  # before the address: calls for rid run from now
            yield self.address
            if caller is None:
                await asyncio.Event().wait()
            else:
                await self._caller_died(caller)
                log.warning("%s lease %s: its coordinator died; freeing its caches", self.kind,
                            rid)
        finally:
            active[rid] -= 1
            if not active[rid]:  # the request may hold a newer lease here (a re-lease)
                del active[rid]
                # frees its caches; a call for rid that reaches the worker after this (sent
                # before the caller was cancelled) is refused, so it cannot re-create them
                await self.servicer.end(rid)

    async def _caller_died(self, caller) -> None:
        """Return once the actor ``caller`` is dead (one watcher per caller, shared by all its
        leases; a slow or briefly unreachable caller is not dead)."""
        watchers = self.caller_watchers
        key = caller._actor_id.hex()
        task = watchers.get(key)
        if task is None or task.done():
            task = watchers[key] = asyncio.ensure_future(self._watch_caller(caller, key))
        await asyncio.shield(task)

    async def _watch_caller(self, caller, key: str) -> None:
        from ray.exceptions import ActorDiedError, RayActorError

        try:
            while True:
                await asyncio.sleep(LEASE_CALLER_CHECK_S)
                try:
                    await asyncio.wait_for(caller.__ray_ready__.remote(), 60)
                except (ActorDiedError, RayActorError) as exc:
                    if type(exc).__name__ == "ActorUnavailableError":
                        continue  # unreachable for now (e.g. restarting node), not dead
                    return
                except Exception:  # noqa: BLE001 - a slow answer is no death
                    continue
        finally:
            self.caller_watchers.pop(key, None)

    def address_of(self) -> str:
        return self.address

    def stats(self) -> dict:
        import os

        import ray

        w = self.worker
        calls = getattr(w, "verifies", None)
        if calls is None:
            calls = getattr(w, "drafts", 0)
        ctx = ray.get_runtime_context()
        return {"sessions": len(w.sessions), "evictions": w.evictions,
                "cached_tokens": w.cached_tokens(), "max_cached_tokens": w.max_cached_tokens,
                "calls": calls, "address": self.address,
                "leases_total": self.leases_total,
                "leases_active": sum(self.active_leases.values()),
                "late_calls_refused": getattr(self.servicer, "refused_late", 0),
                "actor_name": ctx.get_actor_name(), "namespace": ctx.namespace,
                "pid": os.getpid(), "vllm_metrics_port": getattr(w, "metrics_port", None),
                # vLLM executor: the proposer's counters (docs/vllm.md), polled every 2 s
                "drafts": dict(getattr(getattr(self, "draft_counters", None), "last", {}))}

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError(f"{self.kind} data-plane server is not running")
        if getattr(getattr(self.worker, "engine", None), "errored", False):
            raise RuntimeError(f"{self.kind} vLLM engine has failed")  # Serve replaces us


@serve.deployment(name="Drafter")
class DrafterDeployment(_ModelReplica):
    kind = "drafter"

    async def __init__(self, cfg: dict, dataplane: Optional[DataPlaneSecurity] = None):
        super().__init__(dataplane)
        from hsd_serve.engine.drafter import DrafterWorker
        from hsd_serve.models.hf import LoadedModel, describe_model

        config = load_config(cfg)
        threads = config.drafter_deployment.torch_threads
        _set_threads(threads)
        target_vocab = describe_model(config.target.spec()).tokenizer.vocab

        def build():
            if config.drafter_executor == "vllm":  # its forwards in a vLLM engine
                from hsd_serve.serve.vllm.drafter import VllmDraftModel

                spec = config.drafter
                model = VllmDraftModel(spec.resolved_path(), config.drafter_vllm,
                                       threads=threads or 1,
                                       trust_remote_code=spec.trust_remote_code)
            else:
                model = LoadedModel(config.drafter.spec(drafter=True))
            return getattr(model, "worker_class", DrafterWorker)(
                model, target_vocab, proposal_top_m=config.proposal_top_m,
                slrs_max_forwards=config.slrs_max_forwards,
                slrs_max_target_bytes=config.slrs_max_target_bytes,
                max_sessions=config.max_sessions_per_replica,
                max_cached_tokens=config.max_cached_tokens_per_replica)

        await self._start(await asyncio.get_running_loop().run_in_executor(None, build))


@serve.deployment(name="Target")
class TargetDeployment(_ModelReplica):
    kind = "target"

    async def __init__(self, cfg: dict, dataplane: Optional[DataPlaneSecurity] = None):
        super().__init__(dataplane)
        from hsd_serve.engine.target import TargetWorker
        from hsd_serve.models.hf import LoadedModel

        config = load_config(cfg)
        _set_threads(config.target_deployment.torch_threads)
        if config.target_executor == "vllm":
            from hsd_serve.serve.vllm.executor import VllmTarget

            engine = VllmTarget(config.target.resolved_path(), config.vllm,
                                threads=config.target_deployment.torch_threads or 1,
                                load_aware_lookahead=config.load_aware_lookahead,
                                dataplane=dataplane)  # its proposer calls the drafters
            await self._start(await engine.start())
            if engine.k > 0:  # hsd_draft_steps_total / hsd_stale_draft_tokens_total
                from hsd_serve.metrics import DraftStepCounters, RaySink

                self.draft_counters = DraftStepCounters(RaySink(), engine.draft_stats).start()
            return
        await self._start(TargetWorker(
            LoadedModel(config.target.spec()), max_sessions=config.max_sessions_per_replica,
            max_cached_tokens=config.max_cached_tokens_per_replica), max_batch=config.max_batch)


@serve.deployment(name="Coordinator")
@serve.ingress()
class CoordinatorDeployment:
    """Client-facing: gRPC ``hsd.v1.Generation`` (via Ray Serve's gRPC proxy), OpenAI HTTP."""

    async def __init__(self, cfg: dict, drafter_handle, target_handle,
                 dataplane: Optional[DataPlaneSecurity] = None):
        from hsd_serve.core.vocab import same_vocabulary
        from hsd_serve.engine.engine import Coordinator, TargetInfo
        from hsd_serve.metrics import RaySink
        from hsd_serve.models.hf import describe_model
        from hsd_serve.serve.dataplane import ChannelPool
        from hsd_serve.serve.security import ApiKeys

        self.config: AppConfig = load_config(cfg)
        # client keys (both front doors); a configured keys file that cannot be read stops here
        self.api_keys = ApiKeys.from_config(self.config.security)
        if self.api_keys.enabled:
            log.info("client API keys on: %d key(s)", len(self.api_keys))
        else:
            log.warning("client API keys are OFF (security.api_keys_env / api_keys_file): anyone "
                        "who reaches the HTTP or gRPC port can generate")
        self.drafter_handle = drafter_handle
        self.target_handle = target_handle
        target = describe_model(self.config.target.spec())
        same_vocab = False
        if self.config.drafter is not None:
            drafter = describe_model(self.config.drafter.spec())
            same_vocab = same_vocabulary(drafter.tokenizer.vocab, target.tokenizer.vocab)
        self.tokenizer = target.tokenizer
        self.coordinator = Coordinator(
            target=None, info=TargetInfo(target.tokenizer, target.eos_ids, target.max_context),
            drafter=UnavailableDrafter("not leased") if drafter_handle is not None else None,
            same_vocab=same_vocab, draft_timeout_s=self.config.draft_timeout_s,
            drafter_retry_rounds=self.config.drafter_retry_rounds,
            load_aware_lookahead=self.config.load_aware_lookahead, sink=RaySink(),
            target_generates=self.config.target_executor == "vllm",
            drafter_rows=self.config.drafter_executor == "hf", overlap=self.config.overlap,
            overlap_max_batch=self.config.overlap_max_batch,
            overlap_miss=self.config.overlap_miss, overlap_branches=self.config.overlap_branches)
        self.ongoing = 0  # requests in flight here (hsd_ongoing_requests{component="coordinator"})
        self.gauges = None  # started with the first request (needs the replica's event loop)
        self.limits = self.config.request_limits()  # both front doors (gRPC, HTTP)
        self.channels = ChannelPool(security=dataplane)
        self.lease_timeout_s = self.config.lease_timeout_s
        try:  # replicas watch this handle to free the leases of a coordinator that died
            import ray

            self.self_handle = ray.get_runtime_context().current_actor
        except Exception:  # noqa: BLE001 - not running as an actor (local testing)
            self.self_handle = None
        self.drafter_availability = DrafterAvailability()  # shared by this replica's requests
        # clients' gRPC served here: over TLS (security.client_grpc_tls), and/or in plaintext on
        # loopback (client_grpc_local_port: a local `hsd-serve serve`)
        self.grpc_servers: list = []
        sec, opts = self.config.security, self.config.coordinator_deployment
        capacity = opts.max_ongoing_requests + max(0, opts.max_queued_requests)
        from hsd_serve.serve.grpc_api import start_client_grpc_server

        if sec.client_grpc_tls is not None:
            tls = sec.client_grpc_tls
            self.grpc_servers.append(
                (await start_client_grpc_server(self, tls.host, tls.port, capacity, tls))[0])
        if sec.client_grpc_local_port is not None:
            self.grpc_servers.append((await start_client_grpc_server(
                self, "127.0.0.1", sec.client_grpc_local_port, capacity))[0])

    async def __del__(self):
        """Serve's graceful shutdown: stop the gRPC ports served here (5 s for calls in
        flight)."""
        for server in getattr(self, "grpc_servers", ()):
            await server.stop(5)

    # ---- one request through leased replicas ------------------------------------------------
    def _lease_target(self, rid: str) -> LeasedTarget:
        from hsd_serve.serve.dataplane import GrpcTarget

        return LeasedTarget(
            self.target_handle, rid,
            lambda ch: GrpcTarget(ch, timeout_s=self.config.verify_timeout_s),
            channels=self.channels, lease_timeout_s=self.lease_timeout_s,
            failover_s=self.config.target_failover_s, caller=self.self_handle)

    def _lease_drafter(self, rid: str) -> LeasedDrafter:
        from hsd_serve.serve.dataplane import GrpcDrafter

        return LeasedDrafter(
            self.drafter_handle, rid,
            lambda ch: GrpcDrafter(ch, target_vocab_size=self.tokenizer.vocab.size,
                                   timeout_s=self.config.draft_timeout_s),
            channels=self.channels, lease_timeout_s=self.lease_timeout_s,
            caller=self.self_handle, availability=self.drafter_availability,
            first_wait_s=self.config.drafter_lease_wait_s)

    async def stream(self, req, rid: Optional[str] = None):
        """Chunks of one request; raises RequestError before anything starts for bad input."""
        from hsd_serve.engine.types import RequestError, RequestStats
        from hsd_serve.metrics import ReplicaGauges

        if self.gauges is None:
            self.gauges = ReplicaGauges(self.coordinator.sink, "coordinator",
                                        ongoing=lambda: self.ongoing).start()
        try:
            prepared = self.coordinator.prepare(req)
        except RequestError:
            self.coordinator.report(RequestStats(method=req.method), "invalid")
            raise
        rid = rid or uuid.uuid4().hex
        entered = False  # once the coordinator's stream runs, it reports the request itself
        self.ongoing += 1
        self.gauges.update()
        target = self._lease_target(rid)
        drafter = None
        try:
            await target.start()  # overloaded: fail now (RESOURCE_EXHAUSTED/UNAVAILABLE)
            if prepared.method != "ar" and self.drafter_handle is not None:
                drafter = self._lease_drafter(rid)
            entered = True
            # close the inner stream here: its end frees the caches once (the leased ports'
            # free() ends their leases); the close() calls below end only what it left open
            async with contextlib.aclosing(self.coordinator.stream(
                    req, rid, target=target, drafter=drafter, prepared=prepared)) as chunks:
                async for chunk in chunks:
                    if chunk.result is not None:
                        chunk.result.stats.replicas = {
                            "target": list(target.addresses),
                            "drafter": list(drafter.addresses) if drafter is not None else []}
                    yield chunk
        except Exception:
            if not entered:  # no replica could be leased: the round loop never ran
                self.coordinator.report(RequestStats(method=prepared.method), "unavailable")
            raise
        finally:
            self.ongoing -= 1
            self.gauges.update()
            target.close()
            if drafter is not None:
                drafter.close()

    def refused(self) -> None:
        """Count a call refused for want of a valid API key."""
        from hsd_serve.engine.types import RequestStats

        self.coordinator.report(RequestStats(method="other"), "unauthenticated")

    # ---- gRPC ingress: hsd.v1.Generation ------------------------------------------------------
    async def Generate(self, request, grpc_context=None):
        from hsd_serve.serve.grpc_api import generate_unary

        return await generate_unary(self, request, grpc_context)

    async def GenerateStream(self, request, grpc_context=None):
        from hsd_serve.serve.grpc_api import generate_stream

        async for chunk in generate_stream(self, request, grpc_context):
            yield chunk

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check through the same ingress."""
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # ---- HTTP ingress: OpenAI-compatible --------------------------------------------------------
    def __serve_build_asgi_app__(self):
        from hsd_serve.serve.http import build_http_app

        return build_http_app(self)


def build_deployments(config: AppConfig):
    """The application graph: Coordinator(Drafter, Target), each with its own options, and the
    data plane's token (``security.resolve_dataplane_token``) handed to all three."""
    from hsd_serve.serve.security import resolve_dataplane_token

    cfg = config.model_dump()
    dataplane = DataPlaneSecurity.from_config(resolve_dataplane_token(config.security),
                                              config.security)
    target = TargetDeployment.options(**config.target_deployment.serve_options()).bind(
        cfg, dataplane)
    drafter = None
    if config.drafter is not None:
        drafter = DrafterDeployment.options(**config.drafter_deployment.serve_options()).bind(
            cfg, dataplane)
    return CoordinatorDeployment.options(**config.coordinator_deployment.serve_options()).bind(
        cfg, drafter, target, dataplane)
