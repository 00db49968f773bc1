"""Idempotent JetStream provisioning of what PROTOCOL.md names: streams and job consumers."""

import logging

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from worker.core.settings import Settings

log = logging.getLogger(__name__)


def consumer_name(settings: Settings, model_id: str) -> str:
    return f"{settings.subject_prefix.lower()}-jobs-{model_id}"


def stream_configs(settings: Settings) -> list[StreamConfig]:
    common = {
        "storage": StorageType.FILE,
        "num_replicas": settings.stream_replicas,
        "duplicate_window": settings.duplicate_window_s,
    }
    return [
        StreamConfig(
            name=settings.stream("JOBS"),
            subjects=[settings.subject("jobs", "*")],
            retention=RetentionPolicy.WORK_QUEUE,
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=settings.stream("RESULTS"),
            subjects=[settings.subject("results", "*")],
            retention=RetentionPolicy.LIMITS,
            **common,  # type: ignore[arg-type]
        ),
        StreamConfig(
            name=settings.stream("EVENTS"),
            subjects=[settings.subject("events", ">")],
            retention=RetentionPolicy.LIMITS,
            **common,  # type: ignore[arg-type]
        ),
    ]


def consumer_config(settings: Settings, model_id: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(settings, model_id),
        filter_subject=settings.subject("jobs", model_id),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=-1,
        max_waiting=512,
    )


async def ensure_streams(js: JetStreamContext, settings: Settings) -> list[str]:
    """Create the streams that are missing; existing ones are left as the operator set them."""
    created = []
    for config in stream_configs(settings):
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            created.append(config.name)
            log.info("stream_created stream=%s", config.name)
    return created


async def ensure_consumer(js: JetStreamContext, settings: Settings, model_id: str) -> bool:
    """Create the durable pull consumer for `model_id` if missing; True when created."""
    name = consumer_name(settings, model_id)
    try:
        await js.consumer_info(settings.stream("JOBS"), name)
        return False
    except NotFoundError:
        await js.add_consumer(settings.stream("JOBS"), consumer_config(settings, model_id))
        log.info("consumer_created consumer=%s", name)
        return True


async def provision(js: JetStreamContext, settings: Settings, model_ids: list[str]) -> None:
    await ensure_streams(js, settings)
    for model_id in model_ids:
        await ensure_consumer(js, settings, model_id)
