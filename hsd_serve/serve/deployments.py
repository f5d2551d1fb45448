"""Ray Serve deployments: Drafter and Target replicas (a grpc.aio data-plane server each) and the
Coordinator (client-facing gRPC ``Generation`` + OpenAI-compatible HTTP, runs the round loop).

Control plane: for every request the coordinator opens a *lease* on one drafter and one target
replica through their DeploymentHandles — a streaming call that yields the replica's gRPC address
and stays open until the request ends.  Ray Serve therefore routes, balances, counts ongoing
requests for autoscaling and applies ``max_ongoing_requests``/``max_queued_requests``
backpressure; closing the lease frees the request's caches on the replica.  Data plane: the
rounds go straight to those addresses over gRPC (DESIGN.md §5: ~0.5 ms per call vs ~2.7 ms per
handle call).  Replica caches are caches: the coordinator's committed tokens are the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import AsyncIterator, Optional

from ray import serve

from hsd_serve.serve.config import AppConfig, load_config

log = logging.getLogger("hsd_serve.serve")

LEASE_CALLER_CHECK_S = 5.0  # how often a replica checks that a lease holder is still alive


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


class _ModelReplica:
    """Shared by Drafter and Target: load, start the data-plane server, hand out leases."""

    kind = "?"

    async def _start(self, worker, **servicer_options) -> None:
        import ray

        from hsd_serve.serve.dataplane import start_dataplane_server

        self.worker = worker
        self.server, port = await start_dataplane_server(self.kind, worker,
                                                         servicer_options=servicer_options)
        self.servicer = self.server.hsd_servicer  # runs calls on the worker's own thread
        self.address = f"{ray.util.get_node_ip_address()}:{port}"
        log.info("%s replica serving its data plane on %s", self.kind, self.address)
        from hsd_serve.metrics import RaySink, ReplicaGauges

        self.gauges = ReplicaGauges(  # hsd_ongoing_requests / hsd_cache_sessions of this replica
            RaySink(), self.kind,
            ongoing=lambda: sum(getattr(self, "active_leases", {}).values()),
            sessions=lambda: len(self.worker.sessions)).start()

    async def lease(self, rid: str, caller=None) -> AsyncIterator[str]:
        """Yield this replica's gRPC address; hold the lease until the caller closes it, then
        free the request's caches here.  ``caller`` (the coordinator replica's actor handle) is
        watched: Ray does not cancel a dead caller's calls, so a lease whose coordinator died
        ends by itself within ``LEASE_CALLER_CHECK_S`` and frees its caches and its slot."""
        self.leases_total = getattr(self, "leases_total", 0) + 1
        active = self.__dict__.setdefault("active_leases", {})
        active[rid] = active.get(rid, 0) + 1
        try:
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
                await self.servicer.run(self.worker.free, rid)

    async def _caller_died(self, caller) -> None:
        """Return once the actor ``caller`` is dead (one watcher per caller, shared by all its
        leases; a slow or briefly unreachable caller is not dead)."""
        watchers = self.__dict__.setdefault("caller_watchers", {})
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
            self.__dict__.get("caller_watchers", {}).pop(key, None)

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
                "leases_total": getattr(self, "leases_total", 0),
                "leases_active": sum(getattr(self, "active_leases", {}).values()),
                "actor_name": ctx.get_actor_name(), "namespace": ctx.namespace,
                "pid": os.getpid()}

    async def check_health(self) -> None:
        if self.server is None:
            raise RuntimeError(f"{self.kind} data-plane server is not running")


@serve.deployment(name="Drafter")
class DrafterDeployment(_ModelReplica):
    kind = "drafter"

    async def __init__(self, cfg: dict):
        from hsd_serve.engine.drafter import DrafterWorker
        from hsd_serve.models.hf import LoadedModel, describe_model

        config = load_config(cfg)
        _set_threads(config.drafter_deployment.torch_threads)
        model = LoadedModel(config.drafter.spec())
        target_vocab = describe_model(config.target.spec()).tokenizer.vocab
        await self._start(DrafterWorker(
            model, target_vocab, proposal_top_m=config.proposal_top_m,
            slrs_max_forwards=config.slrs_max_forwards,
            slrs_max_target_bytes=config.slrs_max_target_bytes,
            max_sessions=config.max_sessions_per_replica,
            max_cached_tokens=config.max_cached_tokens_per_replica))


@serve.deployment(name="Target")
class TargetDeployment(_ModelReplica):
    kind = "target"

    async def __init__(self, cfg: dict):
        from hsd_serve.engine.target import TargetWorker
        from hsd_serve.models.hf import LoadedModel

        config = load_config(cfg)
        _set_threads(config.target_deployment.torch_threads)
        await self._start(TargetWorker(
            LoadedModel(config.target.spec()), max_sessions=config.max_sessions_per_replica,
            max_cached_tokens=config.max_cached_tokens_per_replica), max_batch=config.max_batch)


class _Lease:
    """An open lease on one replica (closing it frees the request's caches there)."""

    def __init__(self, gen, address: str):
        self.gen = gen
        self.address = address

    def close(self) -> None:
        try:
            self.gen.cancel()
        except Exception:  # noqa: BLE001 - the replica may already be gone
            pass


async def _open_lease(handle, rid: str, timeout_s: float, caller=None) -> _Lease:
    gen = handle.options(stream=True).lease.remote(rid, caller)
    try:
        address = await asyncio.wait_for(gen.__anext__(), timeout_s)
    except BaseException:
        gen.cancel()
        raise
    return _Lease(gen, address)


class _UnavailableDrafter:
    """Drafter port for a request whose drafter lease failed: every round falls back."""

    def __init__(self, reason: str):
        self.reason = reason

    async def _fail(self, *args, **kwargs):
        raise ConnectionError(f"no drafter replica: {self.reason}")

    open = draft = slrs_step = _fail

    async def free(self, rid):
        return None


def _is_transport_failure(exc: BaseException) -> bool:
    import grpc

    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if type(exc).__name__ == "UsageError" and "closed" in str(exc):
        return True  # another request closed the pooled channel to a replica that died
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


def _cancelled_by_others() -> bool:
    """Inside ``except CancelledError``: nobody cancelled this task.  grpc.aio raises
    CancelledError for calls in flight on a channel that another request closed (its replica
    died), and a lease call can end cancelled when its replica dies: a transport failure, not
    the request's own cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


@contextlib.contextmanager
def _cancel_means_replica_died(what: str):
    """Re-raise a ``CancelledError`` that nobody asked for (see ``_cancelled_by_others``) as a
    ``ConnectionError``, so the caller fails over instead of ending the request."""
    try:
        yield
    except asyncio.CancelledError:
        if not _cancelled_by_others():
            raise
        raise ConnectionError(f"{what} cancelled under us (its channel was closed or its lease "
                              "ended: the replica died)") from None


def _replica_gone(exc: BaseException) -> bool:
    """The replica's address is dead (not merely slow): its pooled channel should go too.  A
    deadline is no such sign; closing the shared channel would fail other requests' calls."""
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return isinstance(exc, ConnectionError)


class _LeasedPort:
    """A port bound to a lease; after a transport failure it leases another replica."""

    def __init__(self, dep: "CoordinatorDeployment", handle, rid: str, make_port):
        self.dep = dep
        self.handle = handle
        self.rid = rid
        self.make_port = make_port
        self.lease: Optional[_Lease] = None
        self.port = None
        self.failovers = 0
        self.addresses: list[str] = []  # every replica this request leased, in order

    async def connect(self, timeout_s: Optional[float] = None) -> None:
        lease = await _open_lease(self.handle, self.rid, timeout_s or self.dep.lease_timeout_s,
                                  getattr(self.dep, "self_handle", None))
        self.lease = lease
        self.addresses.append(lease.address)
        self.port = self.make_port(self.dep.channels.get(lease.address))

    async def drop(self, discard_channel: bool = True) -> None:
        if self.lease is not None:
            self.lease.close()
            if discard_channel:
                await self.dep.channels.discard(self.lease.address)
        self.lease, self.port = None, None

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
            self.lease = None


class _LeasedTarget(_LeasedPort):
    """TargetPort that survives the loss of its replica: every call carries the committed tokens,
    so the request resumes on a newly leased replica (a prefill there, never a repeated or missing
    token).  If no replica takes the round within ``target_failover_s`` of the first failure
    (lease waits included), the request fails with ConnectionError (gRPC UNAVAILABLE, HTTP 503)."""

    async def start(self) -> None:
        """Lease the request's first replica.  Overload fails at once (Serve's backpressure →
        RESOURCE_EXHAUSTED / 503; no lease within ``lease_timeout_s`` → UNAVAILABLE / 503); a
        lease that failed because its replica just died is retried like a failover."""
        await self._with_failover(None)

    async def verify(self, *args, **kwargs):
        return await self._with_failover(lambda: self.port.verify(*args, **kwargs))

    async def _with_failover(self, call):
        loop = asyncio.get_running_loop()
        limit = self.dep.config.target_failover_s
        deadline = None  # set at the first failure
        while True:
            try:
                if self.port is None:
                    timeout = self.dep.lease_timeout_s
                    if deadline is not None:
                        timeout = max(0.05, min(timeout, deadline - loop.time()))
                    with _cancel_means_replica_died("target lease"):
                        await self.connect(timeout)
                with _cancel_means_replica_died("target call"):
                    out = None if call is None else await call()
                if deadline is not None:
                    log.warning("request %s: resumed on target %s after %.2fs", self.rid,
                                self.addresses[-1], loop.time() - (deadline - limit))
                return out
            except Exception as exc:  # noqa: BLE001 - classified below
                if self.port is not None and not _is_transport_failure(exc):
                    raise  # the replica answered: this request's own error
                if call is None and deadline is None and (
                        "BackPressure" in type(exc).__name__
                        or isinstance(exc, (TimeoutError, asyncio.TimeoutError))):
                    raise  # overloaded: tell the client now
                await self.drop(_replica_gone(exc))
                self.failovers += 1
                now = loop.time()
                deadline = now + limit if deadline is None else deadline
                if now >= deadline:
                    raise ConnectionError(f"target replica lost and none took over within "
                                          f"{limit:g}s: {type(exc).__name__}: {exc}") from exc
                log.warning("request %s: target replica failed (%s: %s); leasing another",
                            self.rid, type(exc).__name__, exc)
                await asyncio.sleep(min(0.25, deadline - now))

    async def free(self, rid):
        if self.port is not None:
            await self.port.free(rid)


class _LeasedDrafter(_LeasedPort):
    """DrafterPort whose failures the coordinator turns into target-only rounds; the next
    ``open`` (the coordinator re-opens after its retry interval) leases a replica again.

    Leasing runs as a background task: the first ``open`` of a request waits for it (within the
    coordinator's ``draft_timeout_s``), later ones do not — while no drafter replica can be
    leased (it died and Serve is replacing it, or every drafter is saturated) each retry fails at
    once and the rounds go on target-only without stalling.  While the coordinator's last drafter
    lease attempt failed, new requests do not wait for their first lease either."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connecting: Optional[asyncio.Task] = None
        self._failed_once = bool(getattr(self.dep, "drafter_unavailable", False))

    async def connect(self, timeout_s: Optional[float] = None) -> None:
        await super().connect(timeout_s)
        self.dep.drafter_unavailable = False

    async def _ensure_port(self) -> None:
        task = self._connecting
        if task is not None and task.done():
            self._connecting = task = None
        if self.port is not None:
            return
        if task is None:
            task = self._connecting = asyncio.ensure_future(self.connect())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        if self._failed_once and not task.done():
            raise ConnectionError("no drafter replica leased yet")
        await asyncio.shield(task)  # a timeout here cancels this wait, not the lease

    async def _call(self, name, *args, **kwargs):
        try:
            with _cancel_means_replica_died("drafter call"):
                await self._ensure_port()
                return await getattr(self.port, name)(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised; timeouts arrive as cancellation
            self._failed_once = True
            if self.port is None:  # no lease: tell the next requests not to wait for one
                self.dep.drafter_unavailable = True
            if isinstance(exc, Exception) and _is_transport_failure(exc):
                await self.drop(_replica_gone(exc))
            raise

    def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()  # _open_lease cancels the lease call
        self._connecting = None
        super().close()

    async def open(self, *args, **kwargs):
        return await self._call("open", *args, **kwargs)

    async def draft(self, *args, **kwargs):
        return await self._call("draft", *args, **kwargs)

    async def slrs_step(self, *args, **kwargs):
        return await self._call("slrs_step", *args, **kwargs)

    async def free(self, rid):
        if self.port is not None:
            await self.port.free(rid)


@serve.deployment(name="Coordinator")
@serve.ingress()
class CoordinatorDeployment:
    """Client-facing: gRPC ``hsd.v1.Generation`` (via Ray Serve's gRPC proxy), OpenAI HTTP."""

    def __init__(self, cfg: dict, drafter_handle, target_handle):
        from hsd_serve.core.vocab import same_vocabulary
        from hsd_serve.engine.engine import Coordinator, TargetInfo
        from hsd_serve.metrics import RaySink
        from hsd_serve.models.hf import describe_model
        from hsd_serve.serve.convert import RequestDefaults
        from hsd_serve.serve.dataplane import ChannelPool

        self.config: AppConfig = load_config(cfg)
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
            drafter=_UnavailableDrafter("not leased") if drafter_handle is not None else None,
            same_vocab=same_vocab, draft_timeout_s=self.config.draft_timeout_s,
            drafter_retry_rounds=self.config.drafter_retry_rounds,
            load_aware_lookahead=self.config.load_aware_lookahead, sink=RaySink())
        self.ongoing = 0  # requests in flight here (hsd_ongoing_requests{component="coordinator"})
        self.gauges = None  # started with the first request (needs the replica's event loop)
        self.defaults = RequestDefaults(
            max_tokens=min(self.config.default_max_tokens, self.config.max_tokens_limit),
            max_max_tokens=self.config.max_tokens_limit,
            lookahead=self.config.default_lookahead,
            max_prompt_chars=self.config.max_prompt_chars,
            method=self.config.default_method)
        self.channels = ChannelPool()
        self.lease_timeout_s = self.config.lease_timeout_s
        try:  # replicas watch this handle to free the leases of a coordinator that died
            import ray

            self.self_handle = ray.get_runtime_context().current_actor
        except Exception:  # noqa: BLE001 - not running as an actor (local testing)
            self.self_handle = None
        self.drafter_unavailable = False  # the last drafter lease attempt failed

    # ---- one request through leased replicas ------------------------------------------------
    async def stream(self, req, rid: Optional[str] = None):
        """Chunks of one request; raises RequestError before anything starts for bad input."""
        from hsd_serve.serve.dataplane import GrpcDrafter, GrpcTarget

        from hsd_serve.engine.types import RequestError, RequestStats
        from hsd_serve.metrics import ReplicaGauges

        if self.gauges is None:
            self.gauges = ReplicaGauges(self.coordinator.sink, "coordinator",
                                        ongoing=lambda: self.ongoing).start()
        try:
            method, _ = self.coordinator.prepare(req)
        except RequestError:
            self.coordinator.report(RequestStats(method=req.method), "invalid")
            raise
        rid = rid or uuid.uuid4().hex
        entered = False  # once the coordinator's stream runs, it reports the request itself
        self.ongoing += 1
        self.gauges.update()
        target = _LeasedTarget(self, self.target_handle, rid, lambda ch: GrpcTarget(
            ch, timeout_s=self.config.verify_timeout_s))
        drafter = None
        try:
            await target.start()  # overloaded: fail now (RESOURCE_EXHAUSTED/UNAVAILABLE)
            if method != "ar" and self.drafter_handle is not None:
                drafter = _LeasedDrafter(self, self.drafter_handle, rid, lambda ch: GrpcDrafter(
                    ch, target_vocab_size=self.tokenizer.vocab.size,
                    timeout_s=self.config.draft_timeout_s))
            entered = True
            # close the inner stream here, so its caches are freed before the leases close
            async with contextlib.aclosing(self.coordinator.stream(
                    req, rid, target=target, drafter=drafter)) as chunks:
                async for chunk in chunks:
                    if chunk.result is not None:
                        chunk.result.stats.replicas = {
                            "target": list(target.addresses),
                            "drafter": list(drafter.addresses) if drafter is not None else []}
                    yield chunk
        except Exception:
            if not entered:  # no replica could be leased: the round loop never ran
                self.coordinator.report(RequestStats(method=method), "unavailable")
            raise
        finally:
            self.ongoing -= 1
            self.gauges.update()
            target.close()
            if drafter is not None:
                drafter.close()

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
    """The application graph: Coordinator(Drafter, Target), each with its own options."""
    cfg = config.model_dump()
    target = TargetDeployment.options(**config.target_deployment.serve_options()).bind(cfg)
    drafter = None
    if config.drafter is not None:
        drafter = DrafterDeployment.options(**config.drafter_deployment.serve_options()).bind(cfg)
    return CoordinatorDeployment.options(**config.coordinator_deployment.serve_options()).bind(
        cfg, drafter, target)
