"""gRPC glue of the trainer: check a submission, queue it, report jobs and stream their events.

Training runs in the job runner's thread, never in an RPC: a job takes minutes to hours, and
clients follow it through ``Watch``, which replays what they missed after a reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from sensorium.errors import InvalidArgument, ResourceExhausted, validated_json
from sensorium.models.adapters import AdapterStore, check_adapter_id
from sensorium.models.store import ModelRegistry, ModelStore
from sensorium.training.execute import TrainingJobs
from sensorium.training.jobs import Job, JobEvent, JobRunner, JobState, JobStore
from sensorium.training.spec import TrainingSpec
from sensorium.v1 import trainer_pb2 as tpb
from sensorium.v1 import trainer_pb2_grpc as tpb_grpc
from services.trainer.settings import TrainerSettings

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
WATCH_POLL_SECONDS = 1.0
STATES = {JobState.QUEUED: tpb.JOB_STATE_QUEUED, JobState.RUNNING: tpb.JOB_STATE_RUNNING,
          JobState.SUCCEEDED: tpb.JOB_STATE_SUCCEEDED, JobState.FAILED: tpb.JOB_STATE_FAILED,
          JobState.CANCELLED: tpb.JOB_STATE_CANCELLED}
FROM_PROTO = {v: k for k, v in STATES.items()}


def job_to_proto(job: Job) -> tpb.Job:
    return tpb.Job(id=job.id, state=STATES[job.state], spec_json=job.spec_json, spec_digest=job.spec_digest,
                   idempotency_key=job.idempotency_key, adapter_id=job.adapter_id, created=job.created,
                   started=job.started, finished=job.finished, step=job.step, total_steps=job.total_steps,
                   error=job.error, metrics=job.metrics, resumed_from_step=job.resumed_from_step,
                   attempts=job.attempts)


def event_to_proto(event: JobEvent) -> tpb.JobEvent:
    return tpb.JobEvent(job_id=event.job_id, seq=event.seq, kind=event.kind, state=STATES[event.state],
                        step=event.step, total_steps=event.total_steps, epoch=event.epoch, loss=event.loss,
                        learning_rate=event.learning_rate, metrics=event.metrics, eta_seconds=event.eta_seconds,
                        tokens_per_second=event.tokens_per_second, message=event.message, time=event.time)


class TrainerServicer(tpb_grpc.TrainerServicer):
    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        registry = ModelRegistry.default(ModelStore(settings.model_store), settings.models)
        self.adapters = AdapterStore(settings.adapters_dir)
        self.jobs = TrainingJobs(registry, self.adapters, settings.data_dir / "jobs", settings.catalog(),
                                 settings.device)
        self.store = JobStore(settings.data_dir / "jobs.sqlite")
        self.runner = JobRunner(self.store, self.jobs.execute)

    async def ready(self) -> None:
        await asyncio.to_thread(self.adapters.remove_unfinished)  # left by a publish killed half way
        self.runner.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.runner.stop, self.settings.grace_seconds)

    async def Submit(self, request: tpb.SubmitRequest, context) -> tpb.SubmitResponse:
        if len(request.spec_json.encode()) > self.settings.max_spec_bytes:
            raise ResourceExhausted(f"spec of {len(request.spec_json.encode())} bytes; the limit is "
                                    f"max_spec_bytes={self.settings.max_spec_bytes}")
        if not request.spec_json.strip():
            raise InvalidArgument("no spec given (spec_json is empty)")
        spec = validated_json(TrainingSpec, request.spec_json)
        if request.adapter_id:
            check_adapter_id(request.adapter_id)
        plan = await asyncio.to_thread(self.jobs.plan, spec)
        reply = tpb.SubmitResponse(train_examples=plan.train_examples, validation_examples=plan.validation_examples,
                                   test_examples=plan.test_examples, split_digest=plan.split_digest,
                                   total_steps=plan.total_steps)
        if request.validate_only:
            return reply
        queued = len(self.store.list([JobState.QUEUED], limit=self.settings.max_queued_jobs + 1))
        if queued >= self.settings.max_queued_jobs:
            raise ResourceExhausted(f"{queued} jobs are waiting; the limit is max_queued_jobs="
                                    f"{self.settings.max_queued_jobs}")
        canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
        job, created = await asyncio.to_thread(
            self.store.submit, canonical, spec.digest, idempotency_key=request.idempotency_key,
            adapter_id=request.adapter_id, total_steps=plan.total_steps,
            adapter_taken=lambda a: self.adapters.path(a).exists())
        if created:
            logger.info("job queued", extra={"job": job.id, "adapter": job.adapter_id, "spec": spec.digest})
        reply.job.CopyFrom(job_to_proto(job))
        reply.created = created
        return reply

    async def GetJob(self, request: tpb.JobRequest, context) -> tpb.Job:
        return job_to_proto(await asyncio.to_thread(self.store.get, request.id))

    async def ListJobs(self, request: tpb.ListJobsRequest, context) -> tpb.ListJobsResponse:
        states = []
        for s in request.states:
            if s not in FROM_PROTO:
                raise InvalidArgument(f"unknown job state {s}")
            states.append(FROM_PROTO[s])
        limit = min(request.limit or DEFAULT_LIMIT, 10_000)
        jobs = await asyncio.to_thread(self.store.list, states, limit)
        return tpb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    async def CancelJob(self, request: tpb.JobRequest, context) -> tpb.Job:
        return job_to_proto(await asyncio.to_thread(self.runner.cancel, request.id))

    async def Watch(self, request: tpb.WatchRequest, context) -> AsyncIterator[tpb.JobEvent]:
        after = request.after_seq
        while True:
            # the state is read before the events: a job's final event is written with its final
            # state, so once the state is final the events read next are the last (NotFound first)
            final = (await asyncio.to_thread(self.store.get, request.id)).state.final
            events = await asyncio.to_thread(self.store.events, request.id, after,
                                             0.0 if final else WATCH_POLL_SECONDS)
            for event in events:
                after = event.seq
                yield event_to_proto(event)
            if final:
                return


Hook = Callable[[], Awaitable[None]]


def build(settings: TrainerSettings) -> tuple[Callable[[grpc.aio.Server], list[str]], Hook, Hook]:
    """The servicer's registration, its readiness step (the runner starts) and its stop step."""
    servicer: list[TrainerServicer] = []

    def add(server: grpc.aio.Server) -> list[str]:
        servicer.append(TrainerServicer(settings))
        tpb_grpc.add_TrainerServicer_to_server(servicer[0], server)
        return [tpb.DESCRIPTOR.services_by_name["Trainer"].full_name]

    async def ready() -> None:
        await servicer[0].ready()

    async def stop() -> None:
        await servicer[0].stop()

    return add, ready, stop
