"""Errors raised by redisengines, and how a failure travels from an engine to a client.

The tree::

    RedisEnginesError
    ├── InvalidTargetError (also ValueError)      a target that is not a live engine
    ├── SerializationError                        an object cannot be pickled
    ├── DeserializationError                      bytes cannot be unpickled
    ├── ObjectTooBigError                         an object over max_object_size
    ├── ObjectLostError (also KeyError)           a paged object expired or was removed
    ├── ObjectIntegrityError                      a page does not match its manifest
    ├── ProtocolError                             a stream entry that is not a command
    ├── RemoteError                               user code raised on an engine; each instance
    │                                             is also an instance of the original class
    ├── CompositeError                            several targets, at least one failed
    ├── EngineDiedError (also BrokenExecutor)     the engine died holding the command
    │   ├── EngineShutdownError                   the engine was killed or stopped first
    │   └── ActorDiedError                        the actor was killed or its engine is gone
    ├── TimeLimitExceeded (also TimeoutError)     a command ran past its time limit
    ├── QueueFullError                            an engine's inbox is full
    ├── ClusterStateLostError                     the server lost the cluster's state
    ├── CommandLostError                          a Redis crash lost an accepted command
    ├── ServerOutOfMemoryError                    Redis is at maxmemory and refuses writes
    ├── RedisPermissionError (also PermissionError) the ACL user may not do that
    ├── ServerStartError                          the embedded server did not start
    └── ConnectionLostError (also ConnectionError) Redis could not be reached

A failure crosses the wire as a JSON-safe *record* (:func:`error_record`): the qualified
type name, ``str(exc)``, the formatted traceback, a tblib traceback dict and, best effort,
the pickled exception. :func:`error_from_record` turns it back into the exception the user
sees. A dropped command fails with :class:`concurrent.futures.CancelledError`.
"""

from __future__ import annotations

import builtins
import importlib
import json
import sys
import traceback as _traceback
from concurrent.futures import BrokenExecutor, CancelledError
from typing import Any

import cloudpickle
import tblib


class RedisEnginesError(Exception):
    """Base class of every error raised by redisengines."""


class InvalidTargetError(RedisEnginesError, ValueError):
    """Raised when a target is not the id of a live engine."""


class SerializationError(RedisEnginesError):
    """Raised when an object cannot be serialized; nothing was sent."""


class DeserializationError(RedisEnginesError):
    """Raised when bytes cannot be turned back into an object."""


class ObjectTooBigError(RedisEnginesError):
    """Raised when a serialized object is larger than ``max_object_size``."""

    def __init__(self, message: str = "", *, size: int = 0, limit: int = 0) -> None:
        super().__init__(message or f"object of {size:,} bytes exceeds the limit of {limit:,}")
        self.size = size
        self.limit = limit


class ObjectLostError(RedisEnginesError, KeyError):
    """Raised when a stored object's manifest or pages are gone (expired or deleted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ObjectIntegrityError(RedisEnginesError):
    """Raised when a stored object's page does not match its manifest (swapped, truncated
    or altered); nothing is built from it."""


class ProtocolError(RedisEnginesError):
    """Raised when a stream entry is not a well-formed command."""


class EngineDiedError(RedisEnginesError, BrokenExecutor):
    """Raised when the engine holding a command died; ``started`` tells whether it ran."""

    def __init__(self, message: str = "", *, engine_id: int | None = None,
                 started: bool = False, cmd_id: str | None = None) -> None:
        super().__init__(message or f"engine {engine_id} died")
        self.engine_id = engine_id
        self.started = started
        self.cmd_id = cmd_id


class EngineShutdownError(EngineDiedError):
    """Raised when the engine was killed or shut down before finishing the command."""


class ActorDiedError(EngineDiedError):
    """Raised when calling an actor that was killed, failed to start, or lost its engine."""


class PoisonCommandError(EngineDiedError):
    """Raised when a load-balanced call took down every engine it was delivered to, its
    ``max_retries`` re-deliveries included. It is not delivered again: its entry is kept in
    the dead-letter stream ``P:dead`` for an operator to inspect."""


class TimeLimitExceeded(RedisEnginesError, TimeoutError):
    """Raised when a command ran longer than its time limit on the engine."""


class QueueFullError(RedisEnginesError):
    """Raised when an engine's inbox holds the maximum number of commands."""


class ClusterStateLostError(RedisEnginesError):
    """Raised when the server restarted without the cluster's state."""


class CommandLostError(RedisEnginesError):
    """Raised when Redis restarted and no longer holds a command it had accepted (written
    after its last fsync); whether an engine had started it is unknown."""


class RedisPermissionError(RedisEnginesError, PermissionError):
    """Raised when Redis refuses a command or key to this connection's ACL user (NOPERM)."""


class ServerOutOfMemoryError(RedisEnginesError):
    """Raised when Redis refuses a write because it reached ``maxmemory`` (nothing was sent)."""


class ServerStartError(RedisEnginesError):
    """Raised when the embedded Redis-compatible server could not be started."""


class ConnectionLostError(RedisEnginesError, ConnectionError):
    """Raised when Redis cannot be reached after retrying with backoff."""


class RemoteError(RedisEnginesError):
    """Raised when code on an engine raised; also an instance of the original exception class.

    Attributes:
        engine_id: the engine where it happened.
        remote_type: qualified name of the original exception class.
        traceback: the remote traceback text, with the user's frames.
        op: the command that failed (``execute``, ``apply``, ``pull``…).
        cmd_id: the command id (its result key is ``P:{r<cmd_id>}``).
    """

    engine_id: int | None = None
    remote_type: str = "Exception"
    traceback: str = ""
    op: str = ""
    cmd_id: str | None = None
    message: str = ""
    original: BaseException | None = None
    _tb_dict: dict[str, Any] | None = None

    def __str__(self) -> str:
        head = f"[engine {self.engine_id}] {self.remote_type}"
        return f"{head}: {self.message}" if self.message else head

    def __reduce__(self) -> Any:
        return (_rebuild_remote, (self.record(),))

    def record(self) -> dict[str, Any]:
        return {
            "kind": "remote", "type": self.remote_type, "message": self.message,
            "traceback": self.traceback, "engine_id": self.engine_id, "op": self.op,
            "cmd_id": self.cmd_id, "tb": self._tb_dict,
        }

    def raise_original(self) -> None:
        """Raise the original exception, with the remote traceback attached where possible."""
        exc = self.original
        if exc is None:
            raise self
        tb = None
        if self._tb_dict:
            try:
                tb = tblib.Traceback.from_dict(self._tb_dict).as_traceback()
            except Exception:  # a traceback that cannot be rebuilt is not worth a second error
                tb = None
        exc.__cause__ = _RemoteTraceback(self.traceback)
        raise exc.with_traceback(tb)


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class CompositeError(RedisEnginesError):
    """Raised when a command to several engines failed on at least one of them.

    Attributes:
        errors: ``{engine_id: error}``, each exactly what a single target would have raised.
        results: ``{engine_id: value}`` for the engines that succeeded.
    """

    def __init__(self, errors: dict[int, BaseException], results: dict[int, Any]) -> None:
        self.errors = dict(sorted(errors.items()))
        self.results = dict(sorted(results.items()))
        lines = [f"{len(self.errors)} of {len(self.errors) + len(self.results)} engines failed:"]
        lines += [f"  [{eid}] {_one_line(err)}" for eid, err in self.errors.items()]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> Any:
        return (CompositeError, (self.errors, self.results))

    @property
    def traceback(self) -> str:
        return "\n".join(
            f"[engine {eid}]\n{getattr(err, 'traceback', '')}" for eid, err in self.errors.items()
        )

    def raise_original(self) -> None:
        """Raise the first engine's original exception."""
        first = next(iter(self.errors.values()))
        if isinstance(first, RemoteError):
            first.raise_original()
        raise first


def _one_line(err: BaseException) -> str:
    if isinstance(err, RemoteError):
        return f"{err.remote_type}: {err.message}"
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------- wire form

# Errors that are not "user code raised" but a decision of the system: rebuilt as these
# classes directly, never as RemoteError.
_SYSTEM_ERRORS: dict[str, type[BaseException]] = {
    "EngineDiedError": EngineDiedError,
    "EngineShutdownError": EngineShutdownError,
    "ActorDiedError": ActorDiedError,
    "PoisonCommandError": PoisonCommandError,
    "CancelledError": CancelledError,
    "ProtocolError": ProtocolError,
    "ClusterStateLostError": ClusterStateLostError,
    "QueueFullError": QueueFullError,
    "TimeLimitExceeded": TimeLimitExceeded,
    "TimeoutError": TimeoutError,
}


def system_record(type_name: str, message: str, **attrs: Any) -> dict[str, Any]:
    """A record for an error the system itself decided (engine died, command dropped…)."""
    return {"kind": "system", "type": type_name, "message": message, "attrs": attrs}


def error_record(exc: BaseException, *, engine_id: int, op: str, cmd_id: str | None,
                 skip_frames: int = 0) -> dict[str, Any]:
    """The JSON-safe description of an exception raised on an engine.

    ``skip_frames`` drops the engine's own frames at the top of the traceback so that
    the user sees their own code first.
    """
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(_traceback.format_exception(type(exc), exc, tb))
    try:
        tb_dict = tblib.Traceback(tb).to_dict() if tb is not None else None
        json.dumps(tb_dict)
    except Exception:
        tb_dict = None
    cls = type(exc)
    if isinstance(exc, RemoteError):  # re-raised from a nested remote call: name the original
        type_name = exc.remote_type
    elif cls.__module__ == "builtins":
        type_name = cls.__qualname__
    else:
        type_name = f"{cls.__module__}.{cls.__qualname__}"
    return {
        "kind": "remote",
        "type": type_name,
        "message": str(exc),
        "traceback": text,
        "engine_id": engine_id,
        "op": op,
        "cmd_id": cmd_id,
        "tb": tb_dict,
    }


def pickle_exception(exc: BaseException) -> bytes | None:
    """Best effort: the exception pickled without its traceback, or None."""
    try:
        return cloudpickle.dumps(exc.with_traceback(None), protocol=5)
    except Exception:
        return None


def error_from_fields(fields: dict[bytes, bytes]) -> BaseException:
    """The exception described by a stored result's ``error``/``exc`` fields."""
    try:
        record = json.loads(fields[b"error"])
    except (KeyError, ValueError) as exc:
        return DeserializationError(f"unreadable error record: {exc}")
    return error_from_record(record, fields.get(b"exc"))


def error_from_record(record: dict[str, Any], pickled: bytes | None = None) -> BaseException:
    """The exception a client raises for a failure record."""
    if record.get("kind") == "system":
        cls = _SYSTEM_ERRORS.get(record["type"], RedisEnginesError)
        attrs = record.get("attrs") or {}
        if issubclass(cls, EngineDiedError):
            return cls(record["message"], **attrs)
        exc = cls(record["message"])
        for k, v in attrs.items():
            setattr(exc, k, v)
        return exc
    return _rebuild_remote(record, pickled)


def _rebuild_remote(record: dict[str, Any], pickled: bytes | None = None) -> RemoteError:
    original: BaseException | None = None
    if pickled:
        try:
            original = cloudpickle.loads(pickled)
        except Exception:
            original = None
    base = type(original) if isinstance(original, BaseException) else _import_class(record["type"])
    cls = _remote_class(base)
    try:
        err = cls.__new__(cls)
    except TypeError:  # e.g. MemoryError.__new__ refuses subclasses: build it plainly
        err = BaseException.__new__(cls)
    if original is not None:
        try:
            err.__dict__.update(vars(original))
        except TypeError:
            pass
    err.args = original.args if original is not None else (record["message"],)
    err.remote_type = record["type"]
    err.message = record["message"]
    err.traceback = record.get("traceback") or ""
    err.engine_id = record.get("engine_id")
    err.op = record.get("op") or ""
    err.cmd_id = record.get("cmd_id")
    err.original = original
    err._tb_dict = record.get("tb")
    return err


_remote_classes: dict[type, type[RemoteError]] = {}


def _remote_class(base: type | None) -> type[RemoteError]:
    """``RemoteError`` mixed with the original exception class, cached per class.

    Only ``Exception`` subclasses are mixed in: a remote ``SystemExit`` or
    ``KeyboardInterrupt`` re-raised as such would exit the client or pass for its own Ctrl-C.
    """
    while base is not None and issubclass(base, RemoteError) and base is not RemoteError:
        base = base.__bases__[-1]  # a remote error raised again remotely: its original class
    if base is None or not issubclass(base, Exception) or issubclass(base, RemoteError):
        return RemoteError
    cls = _remote_classes.get(base)
    if cls is None:
        try:
            cls = type(f"Remote{base.__name__}", (RemoteError, base),
                       {"__module__": __name__, "__str__": RemoteError.__str__,
                        "__reduce__": RemoteError.__reduce__})
        except TypeError:  # incompatible layouts: keep the plain RemoteError
            cls = RemoteError
        _remote_classes[base] = cls
    return cls


def _import_class(qualified: str) -> type | None:
    """The class named ``module.Qual`` if the client can import it without side effects."""
    if "." not in qualified:
        obj = getattr(builtins, qualified, None)
        return obj if isinstance(obj, type) else None
    module_name, _, qualname = qualified.rpartition(".")
    while module_name:
        try:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
        except Exception:
            module_name, _, head = module_name.rpartition(".")
            qualname = f"{head}.{qualname}"
            continue
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, type) else None
    return None
