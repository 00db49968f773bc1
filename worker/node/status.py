"""The parts of the node's status (`schemas.node.NodeStatus`) made from the agent's pieces:
its software and the runtime's health (and the engine's figures for the metrics)."""

from schemas.node import RuntimeHealth, Software
from schemas.snapshot import ModelSpec
from worker.core.errors import RuntimeStartError
from worker.core.metrics import EngineGauges
from worker.runtime.api import RuntimeFacts
from worker.runtime.supervisor import Supervisor, SupervisorStats


def runtime_facts(supervisor: Supervisor | None) -> RuntimeFacts | None:
    """What the runtime said in its `ready` frame; None before one became ready."""
    if supervisor is None:
        return None
    try:
        return supervisor.facts
    except RuntimeStartError:
        return None


def software(agent_version: str, facts: RuntimeFacts | None) -> Software:
    if facts is None:
        return Software(agent_version=agent_version)
    return Software(
        agent_version=agent_version,
        engine=facts.engine,
        engine_version=facts.engine_version,
        runtime_image=facts.image,
    )


def runtime_health(stats: SupervisorStats | None) -> RuntimeHealth:
    """The supervisor's view and the engine's figures from its last `pong`."""
    if stats is None:
        return RuntimeHealth(restarts=0)
    engine = stats.engine or {}
    queries = engine.get("prefix_cache_queries")
    hits = engine.get("prefix_cache_hits")
    return RuntimeHealth(
        restarts=stats.restarts,
        ping_rtt_ms=stats.ping_rtt_ms,
        running=engine.get("running", stats.active),
        waiting=engine.get("waiting", 0),
        kv_cache_usage=engine.get("kv_cache_usage"),
        prefix_cache_hit_rate=(hits / queries if queries and hits is not None else None),
    )


def engine_gauges(served: ModelSpec | None, stats: SupervisorStats | None) -> EngineGauges | None:
    """The engine's figures for the metrics, labelled with the model it serves."""
    if served is None or stats is None:
        return None
    engine = stats.engine or {}
    return EngineGauges(
        model=served.id,
        running=engine.get("running", stats.active),
        waiting=engine.get("waiting", 0),
        kv_cache_usage=engine.get("kv_cache_usage"),
        prefix_cache_queries=engine.get("prefix_cache_queries"),
        prefix_cache_hits=engine.get("prefix_cache_hits"),
    )
