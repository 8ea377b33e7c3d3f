"""The model currently served: swapped atomically, never closed under a running request.

An install or a rollback calls :meth:`ModelSlot.swap` while the inference API keeps serving.
Requests take a reference with :meth:`ModelSlot.use`; a request that took the old model
finishes on it, and the old model's interpreters are released only when its last request is
done. So a request during a switch is answered by the old or the new model and never fails.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from agent.errors import InferenceError

if TYPE_CHECKING:  # the engine pulls in a TFLite runtime; the slot itself needs none
    from agent.engine import LoadedModel

log = logging.getLogger(__name__)

EMPTY_MESSAGE = "no model is loaded on this device yet; install a bundle first (litefleet-agent install)"


class ModelSlot:
    """Holds at most one :class:`~agent.engine.LoadedModel` and counts the requests using each model."""

    def __init__(self, model: "LoadedModel | None" = None) -> None:
        self._cond = threading.Condition()
        self._current: Any = model
        self._refs: dict[int, int] = {}          # id(model) -> requests currently using it
        self._retiring: dict[int, Any] = {}      # id(model) -> replaced model to close once idle
        self._closing: set[int] = set()          # id(model) of models being closed right now

    def get(self) -> "LoadedModel | None":
        """The model new requests get (no reference taken: for status, not for inference)."""
        with self._cond:
            return self._current

    def swap(self, new: "LoadedModel | None") -> "LoadedModel | None":
        """Serve ``new`` from now on; return the old model, which is closed once no request uses it.

        Swapping in the model already served is a no-op (it is not closed).
        """
        close_now = None
        with self._cond:
            old = self._current
            self._current = new
            if old is not None and old is not new:
                if self._refs.get(id(old), 0) == 0:
                    close_now = old
                    self._closing.add(id(old))
                else:
                    self._retiring[id(old)] = old
            if new is not None:
                self._retiring.pop(id(new), None)   # swapped back in before it went idle: keep it open
            self._cond.notify_all()
        if close_now is not None:
            self._close(close_now)
        return old

    @contextmanager
    def use(self) -> Iterator["LoadedModel"]:
        """Take the current model for one request; raise InferenceError(503) when the slot is empty."""
        with self._cond:
            model = self._current
            if model is None:
                raise InferenceError(503, EMPTY_MESSAGE)
            key = id(model)
            self._refs[key] = self._refs.get(key, 0) + 1
        try:
            yield model
        finally:
            close_now = None
            with self._cond:
                left = self._refs[key] - 1
                if left:
                    self._refs[key] = left
                else:
                    del self._refs[key]
                    close_now = self._retiring.pop(key, None)
                    if close_now is not None:
                        self._closing.add(key)
                self._cond.notify_all()
            if close_now is not None:
                self._close(close_now)

    def in_use(self, model: Any) -> int:
        """How many requests are running on ``model`` now."""
        with self._cond:
            return self._refs.get(id(model), 0)

    def wait_idle(self, model: Any, timeout: float | None = None) -> bool:
        """Block until no request uses ``model`` and, if it was replaced, it is closed (True),
        or ``timeout`` seconds pass (False)."""
        key = id(model)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._refs.get(key, 0) == 0 and key not in self._retiring and key not in self._closing,
                timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Empty the slot at shutdown and wait for the last model's requests; True if it was closed."""
        old = self.swap(None)
        return old is None or self.wait_idle(old, timeout)

    def _close(self, model: Any) -> None:
        try:
            model.close()
        except Exception:  # a failing close must not break the request that triggered it
            log.exception("closing model %s failed", getattr(model, "name", model))
        finally:
            with self._cond:
                self._closing.discard(id(model))
                self._cond.notify_all()
