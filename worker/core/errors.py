"""The node's error tree, mapped once to wire error codes (`WIRE`), and the tools' own.

Whether another attempt may succeed is a branch of the tree, not a flag a subclass may
turn around: every class under `Retryable` is retryable, every class under `Final` is not.

NodeError
├── Retryable               another attempt may succeed
│   ├── RuntimeFailure          the runtime could not produce an outcome
│   │   ├── RuntimeStartError       the container/process failed to start or send `ready`
│   │   ├── RuntimeEnded            the runtime exited on its own (crash, kill, OOM)
│   │   ├── RuntimeClosed           we closed it; work in flight is handed back
│   │   ├── RuntimeBroken           the pipe broke mid-frame, or the runtime sent garbage
│   │   └── RuntimeTimeout          no answer (or no write) within its deadline
│   ├── OutputMalformed         the runtime answered, but not with a valid outcome for a job
│   ├── ModelUnavailable        a model's source is missing or unreachable after retries
│   └── NotAdmitted             the node registry does not admit this node (it serves nothing)
└── Final                   no retry can succeed
    ├── ResourceClosed          a component was used after it was closed (or reopened)
    ├── KeyFileError            the node key file is missing, unsafe or malformed
    ├── SignatureError          an envelope does not verify (bad sig, untrusted key, bad shape)
    │   └── UntrustedSigner         signed by a node that is not admitted (refused unverified)
    ├── JobRejected             a job that can never succeed (terminated, not retried)
    │   ├── BadRequest              malformed, oversized or invalid payload
    │   ├── UnknownModel            the job names a model this node does not serve
    │   ├── DeadlineExceeded        the job's deadline passed before or while it ran
    │   └── Cancelled               the network cancelled the job (`rst.cancel.<job_id>`)
    ├── ItemFailed              the engine reported an error for one job
    ├── RuntimeRefused          a runtime this node must not run (no retry makes it right)
    │   ├── IsolationError          a runtime container is not as hardened as required
    │   └── ImageUnavailable        the pinned runtime image is absent or its digest differs
    ├── ModelInvalid            a model failed its hash check or validation vectors
    └── ConfigRejected          a configuration snapshot was refused

The client and the developer tools are not the node: their errors have a tree of their own.

ToolError
├── ImageBuildError         a runtime image (or its base, or its wheelhouse) could not be built
├── StackError              the dev stack could not be seeded (NATS did not answer)
├── NatsUnreachable         no NATS server answered at the given URL (client side)
└── JobFailed               the node reported a final error for a submitted job (client side)
"""

from schemas.event import ErrorCode


class NodeError(Exception):
    """Base of every error the node raises on purpose.

    Its wire code comes from `WIRE`, by class, never set per instance; whether it may be
    retried, from its branch (`Retryable` or `Final`).
    """

    @property
    def code(self) -> ErrorCode:
        return wire_code(type(self))

    @property
    def retryable(self) -> bool:
        return isinstance(self, Retryable)


class Retryable(NodeError):
    pass


class Final(NodeError):
    pass


class RuntimeFailure(Retryable):
    pass


class RuntimeStartError(RuntimeFailure):
    pass


class RuntimeEnded(RuntimeFailure):
    pass


class RuntimeClosed(RuntimeFailure):
    pass


class RuntimeBroken(RuntimeFailure):
    pass


class RuntimeTimeout(RuntimeFailure):
    pass


class OutputMalformed(Retryable):
    pass


class ModelUnavailable(Retryable):
    pass


class NotAdmitted(Retryable):
    pass


class ResourceClosed(Final):
    pass


class KeyFileError(Final):
    pass


class SignatureError(Final):
    pass


class UntrustedSigner(SignatureError):
    pass


class JobRejected(Final):
    pass


class BadRequest(JobRejected):
    pass


class UnknownModel(JobRejected):
    pass


class DeadlineExceeded(JobRejected):
    pass


class Cancelled(JobRejected):
    pass


class ItemFailed(Final):
    pass


class RuntimeRefused(Final):
    pass


class IsolationError(RuntimeRefused):
    pass


class ImageUnavailable(RuntimeRefused):
    pass


class ModelInvalid(Final):
    pass


class ConfigRejected(Final):
    pass


class ToolError(Exception):
    """Base of the client's and the developer tools' errors (not the node's: no wire code)."""


class ImageBuildError(ToolError):
    pass


class StackError(ToolError):
    pass


class NatsUnreachable(ToolError):
    pass


class JobFailed(ToolError):
    """A client's view: the node reported a final error for the submitted job, or the result
    did not attest the bytes sent. `node_code` is the code the node reported (data from
    the wire, not this package's own mapping)."""

    def __init__(self, message: str, node_code: ErrorCode = ErrorCode.INTERNAL) -> None:
        super().__init__(message)
        self.node_code = node_code


WIRE: dict[type[NodeError], ErrorCode] = {
    NodeError: ErrorCode.INTERNAL,
    Retryable: ErrorCode.INTERNAL,
    Final: ErrorCode.INTERNAL,
    RuntimeFailure: ErrorCode.RUNTIME_FAILURE,
    RuntimeStartError: ErrorCode.RUNTIME_FAILURE,
    RuntimeEnded: ErrorCode.RUNTIME_FAILURE,
    RuntimeClosed: ErrorCode.RUNTIME_FAILURE,
    RuntimeBroken: ErrorCode.RUNTIME_FAILURE,
    RuntimeTimeout: ErrorCode.RUNTIME_FAILURE,
    OutputMalformed: ErrorCode.OUTPUT_MALFORMED,
    ModelUnavailable: ErrorCode.MODEL_INVALID,
    NotAdmitted: ErrorCode.INTERNAL,
    ResourceClosed: ErrorCode.INTERNAL,
    KeyFileError: ErrorCode.INTERNAL,
    SignatureError: ErrorCode.INTERNAL,
    UntrustedSigner: ErrorCode.INTERNAL,
    JobRejected: ErrorCode.INTERNAL,
    BadRequest: ErrorCode.BAD_REQUEST,
    UnknownModel: ErrorCode.UNKNOWN_MODEL,
    DeadlineExceeded: ErrorCode.DEADLINE_EXCEEDED,
    Cancelled: ErrorCode.CANCELLED,
    ItemFailed: ErrorCode.RUNTIME_FAILURE,
    RuntimeRefused: ErrorCode.RUNTIME_FAILURE,
    IsolationError: ErrorCode.RUNTIME_FAILURE,
    ImageUnavailable: ErrorCode.RUNTIME_FAILURE,
    ModelInvalid: ErrorCode.MODEL_INVALID,
    ConfigRejected: ErrorCode.CONFIG_REJECTED,
}
"""Every class of the node's tree with its wire code (a test checks it is complete)."""


def wire_code(cls: type[NodeError]) -> ErrorCode:
    """`WIRE`'s code for `cls`, or for its nearest listed ancestor."""
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
