"""One error tree for all of Fogline, and the one table that maps it to HTTP.

Each error also inherits the stdlib category it belongs to, so callers that
only know ``ValueError`` or ``ConnectionError`` still catch it.
"""

from __future__ import annotations


class FoglineError(Exception):
    """Root of every error Fogline raises on purpose."""

    http_status = 500


class InvalidInputError(FoglineError, ValueError):
    """A request, file or message that does not follow the protocol."""

    http_status = 400


class PayloadTooLargeError(InvalidInputError):
    """A body, tensor or element count past its configured limit."""

    http_status = 413


class RequestTimeoutError(FoglineError, TimeoutError):
    """The client did not send its whole request within the deadline."""

    http_status = 408


class NonFiniteOutputError(FoglineError, ValueError):
    """An answer holds NaN or infinity, which JSON cannot carry.

    4xx, not 5xx: the server works, and the client can ask for binary outputs
    (``binary_data_output``), which carry IEEE values as they are.
    """

    http_status = 422


class AuthError(FoglineError, PermissionError):
    """The caller did not present a valid credential."""

    http_status = 401


class ForbiddenError(FoglineError, PermissionError):
    """The caller is known but may not do this (its role, or a policy such as offline
    signing)."""

    http_status = 403


class NotFoundError(FoglineError, LookupError):
    """Nothing of that name is known here (a rollout, an artifact, a key)."""

    http_status = 404


class ModelNotFoundError(NotFoundError):
    """No model (or version) of that name is known here."""

    def __init__(self, model: str, version: str | None = None) -> None:
        self.model = model
        self.version = version
        what = f"{model!r}" if version is None else f"{model!r} version {version!r}"
        super().__init__(f"unknown model {what}")


class AlreadyExistsError(FoglineError, FileExistsError):
    """Something immutable (a published model version) exists already."""

    http_status = 409


class ConflictError(FoglineError, RuntimeError):
    """The request does not fit the thing's state (aborting a rollout that has finished)."""

    http_status = 409


class ModelNotReadyError(FoglineError, RuntimeError):
    """The model is known but cannot serve right now."""

    http_status = 503


class OverloadedError(FoglineError, RuntimeError):
    """Shed load: the server is past its queue limit; retry later."""

    http_status = 503
    retry_after_s = 1


class DeadlineExceededError(FoglineError, TimeoutError):
    """A request's deadline cannot be met: refused before it runs, not answered late."""

    http_status = 503
    retry_after_s = 1


class CloudUnavailableError(FoglineError, ConnectionError):
    """The cloud fallback could not be reached or answered with an error."""

    http_status = 502


class VerificationError(FoglineError, ValueError):
    """A package, chunk, manifest or command failed its digest or signature check."""

    http_status = 400


class ReplayError(VerificationError):
    """A signed command that is expired, replayed or out of order."""


class TargetMismatchError(VerificationError):
    """A package built for hardware this device does not have (a TensorRT engine for
    another GPU or TensorRT release): refused before a byte of it is downloaded."""


class SelfTestError(FoglineError, RuntimeError):
    """A staged model did not reproduce its golden outputs."""


class RuntimeUnavailableError(FoglineError, RuntimeError):
    """This host lacks what a runtime needs (TensorRT, the CUDA bindings, a GPU): the
    package cannot be served here, and the model in service keeps serving."""

    http_status = 503


class EngineLoadError(FoglineError, ValueError):
    """A model file its runtime refuses: a TensorRT engine that does not deserialize
    (another TensorRT release or GPU, or not an engine) or whose tensors are not the
    manifest's."""


class StoreError(FoglineError, OSError):
    """The model store could not stage or activate a model (disk, permissions)."""


def http_status_of(exc: BaseException) -> int:
    """The HTTP status for an error; anything unexpected is a 500."""
    if isinstance(exc, FoglineError):
        return exc.http_status
    return 500
