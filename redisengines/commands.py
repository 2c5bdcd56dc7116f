"""What each command does on an engine: its namespace, and the actors living there.

The namespace is a plain dict, the globals of everything ``execute`` runs. Functions sent
with ``apply`` that were defined interactively (in ``__main__``) run with the namespace
as their globals, so they see what ``execute`` and ``push`` put there. Remote functions
(``call``) run as they are. Actors are objects kept by id beside the namespace.
"""

from __future__ import annotations

import builtins
import linecache
import pickle
import sys
import types
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from . import signing
from .errors import ActorDiedError, DeserializationError, ObjectLostError, error_from_fields
from .protocol import Command, FutureRef
from .serialization import to_pickle
from .signing import needs_signature
from .store import ObjectStore

# Source of recent `execute` commands stays in linecache so tracebacks show the lines.
_SOURCES_KEPT = 200
# Remote functions and actor classes kept unpickled, by digest.
_CODE_KEPT = 256


class Namespace:
    """An engine's user namespace and the operations on it."""

    def __init__(self, engine_id: int, store: ObjectStore) -> None:
        self.engine_id = engine_id
        self.store = store
        self.user: dict[str, Any] = {}
        self.actors: dict[str, Any] = {}
        self._gone: dict[str, str] = {}  # actor id -> why it is not there (killed, failed)
        self._code: OrderedDict[str, Any] = OrderedDict()  # digest -> function or class
        self._sources: deque[str] = deque()
        self.reset()

    def reset(self) -> None:
        self.user.clear()
        self.user.update({"__name__": "__main__", "__builtins__": builtins})

    def names(self) -> list[str]:
        return sorted(k for k in self.user if not (k.startswith("__") and k.endswith("__")))

    def get(self, name: str) -> Any:
        try:
            return self.user[name]
        except KeyError:
            raise KeyError(name) from None

    # ------------------------------------------------------------------------- ops
    def run(self, cmd: Command) -> Any:
        handler: Callable[[Namespace, Command], Any] = HANDLERS[cmd.op]
        return handler(self, cmd)

    def execute(self, cmd: Command) -> None:
        code = cmd.text("code")
        filename = f"<execute {cmd.id}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        self._sources.append(filename)
        if len(self._sources) > _SOURCES_KEPT:
            linecache.cache.pop(self._sources.popleft(), None)
        compiled = compile(code, filename, "exec")
        exec(compiled, self.user)

    def apply(self, cmd: Command) -> Any:
        f, args, kwargs = self.store.decode(cmd.fields, what="applied function", release=True)
        if isinstance(f, types.FunctionType) and f.__module__ == "__main__":
            f = self._rebind(f)
        return f(*args, **kwargs)

    def _rebind(self, f: types.FunctionType) -> types.FunctionType:
        """``f`` with the namespace as globals; what cloudpickle captured fills the gaps."""
        for name, value in f.__globals__.items():
            if name not in ("__builtins__", "__name__"):
                self.user.setdefault(name, value)
        g = types.FunctionType(f.__code__, self.user, f.__name__, f.__defaults__, f.__closure__)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__qualname__ = f.__qualname__
        g.__dict__.update(f.__dict__)
        return g

    def push(self, cmd: Command) -> None:
        values = self.store.decode(cmd.fields, what="pushed namespace", release=True)
        self.user.update(values)

    def push_serialized(self, cmd: Command) -> None:
        blobs: dict[str, bytes] = self.store.decode(cmd.fields, what="pushed bytes", release=True)
        values = {}
        for name, blob in blobs.items():
            try:
                values[name] = pickle.loads(blob)
            except Exception as exc:
                raise DeserializationError(
                    f"cannot unpickle the bytes pushed as {name!r} on engine {self.engine_id}: "
                    f"{type(exc).__name__}: {exc}") from exc
        self.user.update(values)

    def pull(self, cmd: Command) -> Any:
        names = cmd.names() or []
        values = [self.get(n) for n in names]
        return values[0] if cmd.flag("single") else values

    def pull_serialized(self, cmd: Command) -> Any:
        blobs = [to_pickle(self.get(n), what=repr(n)) for n in cmd.names() or []]
        return blobs[0] if cmd.flag("single") else blobs

    def pull_namespace(self, cmd: Command) -> dict[str, Any]:
        names = cmd.names()
        if names is None:
            names = self.names()
        return {n: self.get(n) for n in names}

    def keys(self, cmd: Command) -> list[str]:
        return self.names()

    def reset_op(self, cmd: Command) -> None:
        self.reset()

    # ------------------------------------------------------- remote functions, actors
    def resolve(self, value: Any) -> Any:
        """The value a :class:`FutureRef` stands for, read from its stored result."""
        if not isinstance(value, FutureRef):
            return value
        fields = self.store.r.hgetall(self.store.keys.result(value.cmd_id))
        if not fields:
            raise ObjectLostError(f"the result of {value.cmd_id}, passed as an argument, "
                                  "is gone (expired or never stored)")
        signer = self.store.signer
        if signer is not None and needs_signature(fields):
            signer.verify(fields, self.store.keys.result(value.cmd_id), skip=signing.RESULT)
        if fields.get(b"status") != b"ok":
            raise error_from_fields(fields)
        return self.store.decode(fields, what=f"result of {value.cmd_id}")

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[list[Any], dict[str, Any]]:
        return [self.resolve(a) for a in args], {k: self.resolve(v) for k, v in kwargs.items()}

    def _unpickled(self, digest: str, blob: bytes) -> Any:
        """A remote function or actor class, unpickled once per engine (LRU by digest)."""
        code = self._code.get(digest)
        if code is None:
            try:
                code = pickle.loads(blob)
            except Exception as exc:
                raise DeserializationError(
                    f"cannot unpickle the remote code on engine {self.engine_id}: "
                    f"{type(exc).__name__}: {exc}") from exc
            self._code[digest] = code
            if len(self._code) > _CODE_KEPT:
                self._code.popitem(last=False)
        else:
            self._code.move_to_end(digest)
        return code

    def call(self, cmd: Command) -> Any:
        # Payloads of calls and actors are released by their client, not here: a task is
        # re-queued if this engine dies, and its next engine must still find them.
        digest, blob, args, kwargs = self.store.decode(cmd.fields, what="remote call")
        f = self._unpickled(digest, blob)
        args, kwargs = self._arguments(args, kwargs)
        return f(*args, **kwargs)

    def actor_new(self, cmd: Command) -> None:
        aid = cmd.text("actor")
        try:
            digest, blob, args, kwargs = self.store.decode(cmd.fields, what="actor class")
            cls = self._unpickled(digest, blob)
            args, kwargs = self._arguments(args, kwargs)
            self.actors[aid] = cls(*args, **kwargs)
        except BaseException as exc:
            self._gone[aid] = f"failed to start: {type(exc).__name__}: {exc}"
            raise

    def actor_call(self, cmd: Command) -> Any:
        aid = cmd.text("actor")
        instance = self.actors.get(aid)
        if instance is None:
            why = self._gone.get(aid, f"is not on engine {self.engine_id} (it was never "
                                      "created here)")
            raise ActorDiedError(f"actor {aid} {why}", engine_id=self.engine_id)
        args, kwargs = self.store.decode(cmd.fields, what="actor call")
        args, kwargs = self._arguments(args, kwargs)
        return getattr(instance, cmd.text("method"))(*args, **kwargs)

    def actor_del(self, cmd: Command) -> None:
        aid = cmd.text("actor")
        self.actors.pop(aid, None)
        self._gone[aid] = "was killed"


HANDLERS: dict[str, Callable[[Namespace, Command], Any]] = {
    "execute": Namespace.execute,
    "apply": Namespace.apply,
    "push": Namespace.push,
    "push_serialized": Namespace.push_serialized,
    "pull": Namespace.pull,
    "pull_serialized": Namespace.pull_serialized,
    "pull_namespace": Namespace.pull_namespace,
    "keys": Namespace.keys,
    "reset": Namespace.reset_op,
    "call": Namespace.call,
    "actor_new": Namespace.actor_new,
    "actor_call": Namespace.actor_call,
    "actor_del": Namespace.actor_del,
}


def describe(value: Any) -> dict[str, Any]:
    """Type and approximate size of a value, for the namespace index."""
    nbytes = getattr(value, "nbytes", None)
    if not isinstance(nbytes, int):
        try:
            nbytes = sys.getsizeof(value)
        except Exception:
            nbytes = -1
    t = type(value)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return {"type": name, "size": nbytes}
