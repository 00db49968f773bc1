"""The package's error tree, mapped once to wire error codes (`WIRE`).

NodeError
├── ResourceClosed          a component was used after it was closed (or reopened)
├── KeyFileError            the node key file is missing, unsafe or malformed
├── SignatureError          an envelope does not verify (bad sig, untrusted key, bad shape)
├── JobRejected             a job that can never succeed (terminated, not retried)
│   ├── BadRequest              malformed, oversized or invalid payload
│   ├── UnknownModel            the job names a model this node does not serve
│   ├── DeadlineExceeded        the job's deadline passed before or while it ran
│   └── Cancelled               the network cancelled the job (`rst.cancel.<job_id>`)
├── RuntimeFailure          the runtime could not produce an outcome (retryable)
│   ├── RuntimeStartError       the container/process failed to start or send `ready`
│   │   ├── IsolationError          a runtime container is not as hardened as required
│   │   └── ImageUnavailable        the pinned runtime image is absent or its digest differs
│   ├── RuntimeEnded            the runtime exited on its own (crash, kill, OOM)
│   ├── RuntimeClosed           we closed it; work in flight is handed back
│   ├── RuntimeBroken           the pipe broke mid-frame, or the runtime sent garbage
│   └── RuntimeTimeout          no answer (or no write) within its deadline
├── OutputMalformed         the runtime answered, but not with a valid outcome for a job
├── ItemFailed              the engine reported an error for one job of a batch
├── ModelInvalid            a model failed its hash check or validation vectors
│   └── ModelUnavailable        its source is missing or unreachable after retries
├── ConfigRejected          a configuration snapshot was refused
├── ImageBuildError         a runtime image (or its base, or its wheelhouse) could not be built
├── StackError              the dev stack could not be seeded (NATS did not answer)
├── NatsUnreachable         no NATS server answered at the given URL (client side)
└── JobFailed               the node reported a final error for a submitted job (client side)
"""

from schemas.event import ErrorCode


class NodeError(Exception):
    """Base of every error the package raises on purpose.

    Its wire code and retryability come from `WIRE`, by class, never set per instance.
    """

    @property
    def code(self) -> ErrorCode:
        return wire_entry(type(self))[0]

    @property
    def retryable(self) -> bool:
        return wire_entry(type(self))[1]


class ResourceClosed(NodeError):
    pass


class KeyFileError(NodeError):
    pass


class SignatureError(NodeError):
    pass


class JobRejected(NodeError):
    pass


class BadRequest(JobRejected):
    pass


class UnknownModel(JobRejected):
    pass


class DeadlineExceeded(JobRejected):
    pass


class Cancelled(JobRejected):
    pass


class RuntimeFailure(NodeError):
    pass


class RuntimeStartError(RuntimeFailure):
    pass


class IsolationError(RuntimeStartError):
    pass


class ImageUnavailable(RuntimeStartError):
    pass


class RuntimeEnded(RuntimeFailure):
    pass


class RuntimeClosed(RuntimeFailure):
    pass


class RuntimeBroken(RuntimeFailure):
    pass


class RuntimeTimeout(RuntimeFailure):
    pass


class OutputMalformed(NodeError):
    pass


class ItemFailed(NodeError):
    pass


class ModelInvalid(NodeError):
    pass


class ModelUnavailable(ModelInvalid):
    pass


class ConfigRejected(NodeError):
    pass


class ImageBuildError(NodeError):
    pass


class StackError(NodeError):
    pass


class NatsUnreachable(NodeError):
    pass


class JobFailed(NodeError):
    """A client's view: the node reported a final error for the submitted job, or the result
    did not attest the bytes sent. `node_code` is the code the node reported (data from
    the wire, not this package's own mapping)."""

    def __init__(self, message: str, node_code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(message)
        self.node_code = node_code


WIRE: dict[type[NodeError], tuple[ErrorCode, bool]] = {
    # class: (wire code, retryable: another attempt may succeed)
    NodeError: (ErrorCode.INTERNAL, False),
    ResourceClosed: (ErrorCode.INTERNAL, False),
    KeyFileError: (ErrorCode.INTERNAL, False),
    SignatureError: (ErrorCode.INTERNAL, False),
    JobRejected: (ErrorCode.INTERNAL, False),
    BadRequest: (ErrorCode.BAD_REQUEST, False),
    UnknownModel: (ErrorCode.UNKNOWN_MODEL, False),
    DeadlineExceeded: (ErrorCode.DEADLINE_EXCEEDED, False),
    Cancelled: (ErrorCode.CANCELLED, False),
    RuntimeFailure: (ErrorCode.RUNTIME_FAILURE, True),
    RuntimeStartError: (ErrorCode.RUNTIME_FAILURE, True),
    IsolationError: (ErrorCode.RUNTIME_FAILURE, False),
    ImageUnavailable: (ErrorCode.RUNTIME_FAILURE, False),
    RuntimeEnded: (ErrorCode.RUNTIME_FAILURE, True),
    RuntimeClosed: (ErrorCode.RUNTIME_FAILURE, True),
    RuntimeBroken: (ErrorCode.RUNTIME_FAILURE, True),
    RuntimeTimeout: (ErrorCode.RUNTIME_FAILURE, True),
    OutputMalformed: (ErrorCode.OUTPUT_MALFORMED, True),
    ItemFailed: (ErrorCode.RUNTIME_FAILURE, False),
    ModelInvalid: (ErrorCode.MODEL_INVALID, False),
    ModelUnavailable: (ErrorCode.MODEL_INVALID, True),
    ConfigRejected: (ErrorCode.CONFIG_REJECTED, False),
    ImageBuildError: (ErrorCode.INTERNAL, False),
    StackError: (ErrorCode.INTERNAL, False),
    NatsUnreachable: (ErrorCode.INTERNAL, False),
    JobFailed: (ErrorCode.INTERNAL, False),
}
"""Every class of the tree, with its wire code and retryability (a test checks it is complete)."""


def wire_entry(cls: type[NodeError]) -> tuple[ErrorCode, bool]:
    """`WIRE`'s entry for `cls`, or for its nearest listed ancestor."""
    for klass in cls.__mro__:
        if klass in WIRE:
            return WIRE[klass]
    return WIRE[NodeError]


def error_code(exc: BaseException) -> ErrorCode:
    """The wire code for any exception; unexpected ones are `INTERNAL`."""
    return exc.code if isinstance(exc, NodeError) else ErrorCode.INTERNAL


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed; unexpected exceptions are not retried."""
    return exc.retryable if isinstance(exc, NodeError) else False
