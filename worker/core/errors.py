"""The agent's error tree, mapped once to wire error codes.

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
│   ├── RuntimeEnded            the runtime exited on its own (crash, kill, OOM)
│   ├── RuntimeClosed           we closed it; work in flight is handed back
│   ├── RuntimeBroken           the pipe broke mid-frame, or the runtime sent garbage
│   └── RuntimeTimeout          no answer (or no write) within its deadline
├── OutputMalformed         the runtime answered, but not with a valid outcome for a job
├── ItemFailed              the engine reported an error for one job of a batch
├── ModelInvalid            a model failed its hash check or validation vectors
│   └── ModelUnavailable        its source is missing or unreachable after retries
├── ConfigRejected          a configuration snapshot was refused
├── IsolationError          a runtime container is not as hardened as required
└── ImageUnavailable        the pinned runtime image is absent or its digest differs
"""

from schemas.event import ErrorCode


class NodeError(Exception):
    """Base of every error the agent raises on purpose."""

    code = ErrorCode.INTERNAL
    retryable = False


class ResourceClosed(NodeError):
    pass


class KeyFileError(NodeError):
    pass


class SignatureError(NodeError):
    pass


class JobRejected(NodeError):
    pass


class BadRequest(JobRejected):
    code = ErrorCode.BAD_REQUEST


class UnknownModel(JobRejected):
    code = ErrorCode.UNKNOWN_MODEL


class DeadlineExceeded(JobRejected):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(JobRejected):
    code = ErrorCode.CANCELLED


class RuntimeFailure(NodeError):
    code = ErrorCode.RUNTIME_FAILURE
    retryable = True


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


class OutputMalformed(NodeError):
    code = ErrorCode.OUTPUT_MALFORMED
    retryable = True


class ItemFailed(NodeError):
    code = ErrorCode.RUNTIME_FAILURE
    retryable = False


class ModelInvalid(NodeError):
    code = ErrorCode.MODEL_INVALID


class ModelUnavailable(ModelInvalid):
    retryable = True


class ConfigRejected(NodeError):
    code = ErrorCode.CONFIG_REJECTED


class IsolationError(RuntimeStartError):
    retryable = False


class ImageUnavailable(RuntimeStartError):
    retryable = False


def error_code(exc: BaseException) -> ErrorCode:
    """The wire code for any exception; unexpected ones are `INTERNAL`."""
    return exc.code if isinstance(exc, NodeError) else ErrorCode.INTERNAL
