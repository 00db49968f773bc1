"""Who may do what on the bus: the four roles of PROTOCOL.md ("Roles and permissions") as
nats-server permissions, and the `authorization` block of a server config that gives each
role's nkey users exactly those. Pure: no I/O.

nats-server enforces these, not our code: a user publishing or subscribing outside its
allow lists gets a permissions violation and the message goes nowhere.
"""

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum


class Role(StrEnum):
    AUTHORITY = "authority"
    """Writes the config bucket and the node registry, provisions streams, uploads models."""
    CLIENT = "client"
    """The scheduler: publishes jobs and cancels, reads results, streams and error events."""
    NODE = "node"
    """Pulls its model's jobs; publishes results, stream messages, events, heartbeats; reads
    the config bucket, the node registry and the model store."""
    GATEWAY = "gateway"
    """A client (the OpenAI-compatible HTTP front door)."""


def _read_bucket(stream: str) -> list[str]:
    """The JetStream API calls that read (get, watch) the KV or object stream `stream`."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
    ]


def permissions(
    role: Role, *, prefix: str = "rst", models_bucket: str = "rst_models"
) -> dict[str, object]:
    """The nats-server `permissions` map of `role`: publish and subscribe allow lists."""
    p, stream = prefix, prefix.upper()
    config_kv, registry_kv = f"KV_{p}_config", f"KV_{p}_nodes"
    reads = [
        "$JS.API.INFO",
        *_read_bucket(config_kv),
        *_read_bucket(registry_kv),
        "$JS.FC.>",  # flow-control replies of the watches' ordered consumers
    ]
    if role is Role.AUTHORITY:
        return {
            "publish": {
                "allow": [
                    "$JS.API.>",
                    f"$KV.{p}_config.>",
                    f"$KV.{p}_nodes.>",
                    f"$O.{models_bucket}.>",
                    "$JS.FC.>",
                ]
            },
            "subscribe": {"allow": ["_INBOX.>"]},
        }
    if role is Role.NODE:
        return {
            "publish": {
                "allow": [
                    f"{p}.results.*",
                    f"{p}.stream.*",
                    f"{p}.events.>",
                    f"{p}.nodes.*.heartbeat",
                    f"$JS.API.STREAM.INFO.{stream}_JOBS",
                    f"$JS.API.STREAM.INFO.{stream}_RESULTS",
                    f"$JS.API.STREAM.INFO.{stream}_EVENTS",
                    f"$JS.API.CONSUMER.INFO.{stream}_JOBS.*",
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}_JOBS.*",
                    f"$JS.ACK.{stream}_JOBS.>",
                    *reads,
                    *_read_bucket(f"OBJ_{models_bucket}"),
                    # switch claims (worker/node/claims.py): nodes coordinate among
                    # themselves; a claim expires with the bucket's max age
                    f"$JS.API.STREAM.CREATE.KV_{p}_switch",
                    *_read_bucket(f"KV_{p}_switch"),
                    f"$KV.{p}_switch.>",
                ]
            },
            "subscribe": {"allow": ["_INBOX.>", f"{p}.cancel.*", f"{p}.nodes.*.status"]},
            # The status endpoint answers on the requester's reply subject.
            "allow_responses": True,
        }
    # CLIENT and GATEWAY: a gateway is a client of the network.
    return {
        "publish": {
            "allow": [
                f"{p}.jobs.*",
                f"{p}.cancel.*",
                f"{p}.nodes.*.status",
                f"$JS.API.STREAM.INFO.{stream}_JOBS",
                f"$JS.API.STREAM.INFO.{stream}_RESULTS",
                "$JS.API.STREAM.NAMES",  # which stream holds a subject (results)
                f"$JS.API.CONSUMER.CREATE.{stream}_RESULTS",
                f"$JS.API.CONSUMER.CREATE.{stream}_RESULTS.>",
                f"$JS.API.CONSUMER.DELETE.{stream}_RESULTS.>",
                f"$JS.API.CONSUMER.INFO.{stream}_RESULTS.>",
                *reads,
            ]
        },
        "subscribe": {
            "allow": [
                "_INBOX.>",
                f"{p}.stream.*",
                f"{p}.events.>",
                f"{p}.nodes.*.heartbeat",
            ]
        },
    }


def authorization_block(
    users: Mapping[Role, Iterable[str]], *, prefix: str = "rst", models_bucket: str = "rst_models"
) -> str:
    """The nats-server config `authorization { users = [...] }` for the given nkey public
    keys (`U...`) per role. JSON is valid nats-server config syntax."""
    entries = [
        {
            "nkey": nkey,
            "permissions": permissions(role, prefix=prefix, models_bucket=models_bucket),
        }
        for role, nkeys in users.items()
        for nkey in nkeys
    ]
    return "authorization " + json.dumps({"users": entries}, indent=2)
