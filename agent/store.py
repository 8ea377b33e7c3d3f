"""The on-device model store: content-addressed slots, an atomic active pointer, a journal.

Layout under the state directory::

    models/<sha256>/model.tflite     one slot per model (named by the model's sha256), holding
    models/<sha256>/manifest.json    the signed manifest and its signature, so the model can be
    models/<sha256>/manifest.sig     re-verified at any time
    staging/                         half-written slots; emptied whenever the store is opened
    current.json                     the pointer: {"active": slot, "previous": slot}
    journal.json                     the step the current install or rollback has reached
    lock                             flock'ed by whoever changes the store

The one thing that makes a model active is the atomic replacement of ``current.json``
(``os.replace`` after fsync of the file and its directory), which also moves the old active
model to ``previous``. Everything before it only adds an unreferenced slot, everything after
it only removes unreferenced slots, so a ``kill -9`` at any moment leaves the old or the new
model active and loadable. The journal tells recovery (run on every open) what was under way;
recovery removes half-written staging and slots no pointer refers to, and marks the journal done.

Only the active and the previous model are kept; older slots are garbage-collected.

An encrypted model is stored as it was sent, as ``model.tflite.enc`` (the manifest's
``model.filename``): the slot holds only ciphertext, and the installer decrypts it in memory at
every load (install, restart, rollback).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError, InstallError
from agent.protocol.bundle import MANIFEST_NAME, SIGNATURE_NAME, VerifiedBundle, verify_manifest
from agent.protocol.keys import PublicKey, atomic_write
from agent.protocol.manifest import Manifest, ModelData, check_model

# The steps an install records in the journal, in order. A rollback skips "staged".
STEPS = ("begin", "staged", "loaded", "smoke_ok", "activated", "done")
# Where a test may kill the process (see crash_point): the journal steps plus two moments between
# them that matter: a half-written staging slot, and the pointer switched but not yet journaled.
CRASH_POINTS = ("begin", "staging", "staged", "loaded", "smoke_ok", "switched", "activated", "done")
CRASH_ENV = "LITEFLEET_CRASH_AT"

POINTER_NAME = "current.json"
JOURNAL_NAME = "journal.json"
LOCK_NAME = "lock"
POINTER_FORMAT = "litefleet.store"


def crash_point(step: str) -> None:
    """FOR TESTS ONLY: SIGKILL this process when ``$LITEFLEET_CRASH_AT`` names ``step``.

    The crash tests set the variable on a real ``litefleet-agent install-bundle`` process to prove
    that a kill at each step leaves a loadable model active. Unset (always, in production) this is
    one dictionary lookup.
    """
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class StoreCorruptError(AgentError):
    """A file of the model store cannot be read (disk damage or hand editing)."""


@dataclass(frozen=True)
class InstalledModel:
    """A model in a store slot; ``slot`` is the model's sha256 (plus a suffix in a rare collision)."""

    manifest: Manifest
    model_path: Path
    slot: str

    @property
    def directory(self) -> Path:
        return self.model_path.parent

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def signature_path(self) -> Path:
        return self.directory / SIGNATURE_NAME

    def read_model(self) -> bytes:
        """The model bytes as stored (not re-checked: see :meth:`read_verified`)."""
        try:
            return self.model_path.read_bytes()
        except OSError as exc:
            raise StoreCorruptError(f"{self.model_path}: cannot read the stored model ({exc})") from None

    def read_verified(self, trusted: Iterable[PublicKey]) -> VerifiedBundle:
        """Re-check the stored signature and the model's hashes; raise BundleError when they fail."""
        try:
            manifest_bytes = self.manifest_path.read_bytes()
            signature_bytes = self.signature_path.read_bytes()
        except OSError as exc:
            raise StoreCorruptError(f"{self.directory}: cannot read the stored manifest ({exc})") from None
        manifest, signer = verify_manifest(manifest_bytes, signature_bytes, list(trusted))
        model = self.read_model()
        check_model(manifest, model)
        return VerifiedBundle(manifest=manifest, signer=signer, model=model)

    def describe(self) -> dict[str, Any]:
        return {"name": self.manifest.name, "version": self.manifest.version, "slot": self.slot,
                "sha256": self.manifest.sha256, "size": self.manifest.size}


class ModelStore:
    """The models on this device. Opening it recovers from any interrupted install."""

    def __init__(self, state_dir: str | os.PathLike[str], *, lock_wait_s: float = 10.0) -> None:
        self.state_dir = Path(state_dir)
        # How long an install waits for another writer (a recovery by `status`, say) to let go.
        self.lock_wait_s = lock_wait_s
        self.models_dir = self.state_dir / "models"
        self.staging_dir = self.state_dir / "staging"
        self.pointer_path = self.state_dir / POINTER_NAME
        self.journal_path = self.state_dir / JOURNAL_NAME
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self.staging_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreCorruptError(f"{self.state_dir}: cannot create the model store ({exc.strerror}); "
                                    f"check state_dir and its permissions") from None
        self.recovered: list[str] = self.recover()

    # reading ------------------------------------------------------------------------------

    def pointer(self) -> dict[str, str | None]:
        """``{"active": slot or None, "previous": slot or None}``."""
        try:
            doc = json.loads(self.pointer_path.read_bytes())
        except FileNotFoundError:
            return {"active": None, "previous": None}
        except (OSError, ValueError) as exc:
            raise StoreCorruptError(f"{self.pointer_path}: unreadable ({exc}); the store cannot tell which "
                                    f"model is active") from None
        return {"active": doc.get("active"), "previous": doc.get("previous")}

    def active(self) -> InstalledModel | None:
        return self._installed(self.pointer()["active"])

    def previous(self) -> InstalledModel | None:
        return self._installed(self.pointer()["previous"])

    def slot(self, slot: str) -> InstalledModel:
        installed = self._installed(slot)
        assert installed is not None
        return installed

    def slots(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir() if p.is_dir())

    def journal(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.journal_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # written atomically, so only hand editing gets here; recovery rewrites it

    def status(self) -> dict[str, Any]:
        active, previous = self.active(), self.previous()
        return {"active": active.describe() if active else None,
                "previous": previous.describe() if previous else None,
                "journal": self.journal()}

    def _installed(self, slot: str | None) -> InstalledModel | None:
        if not slot:
            return None
        directory = self.models_dir / slot
        try:
            manifest = Manifest.parse((directory / MANIFEST_NAME).read_bytes(), str(directory / MANIFEST_NAME))
        except OSError as exc:
            raise StoreCorruptError(f"{directory}: slot named by {self.pointer_path} cannot be read "
                                    f"({exc.strerror or exc})") from None
        except AgentError:
            raise
        except Exception as exc:  # BundleError from a damaged manifest
            raise StoreCorruptError(f"{directory}: stored manifest is damaged ({exc})") from None
        return InstalledModel(manifest=manifest, model_path=directory / manifest.model["filename"], slot=slot)

    def _slot_ok(self, slot: str | None) -> bool:
        if not slot:
            return False
        try:
            installed = self._installed(slot)
            return installed is not None and installed.model_path.is_file()
        except AgentError:
            return False

    # changing -----------------------------------------------------------------------------

    def begin_install(self, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes) -> "Transaction":
        """Lock the store and journal the start of an install; stage the model next."""
        lock = self._lock(self.lock_wait_s)
        try:
            pointer = self.pointer()
            slot = self._slot_name(manifest, manifest_bytes, pointer)
            txn = Transaction(self, lock, "install", slot, pointer, manifest)
            txn.manifest_bytes = manifest_bytes
            txn.signature_bytes = signature_bytes
            txn.record("begin")
        except BaseException:
            os.close(lock)
            raise
        return txn

    def begin_rollback(self) -> "Transaction":
        """Lock the store and journal the start of a rollback to the previous model."""
        lock = self._lock(self.lock_wait_s)
        try:
            pointer = self.pointer()
            target = pointer["previous"]
            if not target:
                raise InstallError("no_previous", "there is no previous model to roll back to")
            txn = Transaction(self, lock, "rollback", target, pointer, self.slot(target).manifest)
            txn.record("begin")
        except BaseException:
            os.close(lock)
            raise
        return txn

    def _slot_name(self, manifest: Manifest, manifest_bytes: bytes, pointer: dict[str, str | None]) -> str:
        base = manifest.sha256
        existing = self.models_dir / base / MANIFEST_NAME
        kept = {pointer["active"], pointer["previous"]}
        if base not in kept or not existing.exists() or existing.read_bytes() == manifest_bytes:
            return base
        # The same model bytes re-released under another manifest (a new version): a sibling slot.
        return f"{base}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"

    def _lock(self, wait_s: float = 0.0) -> int:
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)  # flock has no timeout; a short poll until the deadline
                    continue
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise InstallError("busy", f"{self.state_dir} is being changed by another process"
                                       f"{f' (pid {holder})' if holder else ''}; try again when it is done") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _write_json(self, path: Path, doc: dict[str, Any]) -> None:
        atomic_write(path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def _write_pointer(self, active: str | None, previous: str | None) -> None:
        self._write_json(self.pointer_path, {"format": POINTER_FORMAT, "version": 1,
                                             "active": active, "previous": previous})

    # recovery and garbage collection -------------------------------------------------------

    def recover(self) -> list[str]:
        """Finish or undo whatever a killed process left; return what was done, for the log."""
        try:
            lock = self._lock()
        except InstallError:
            return ["recovery skipped: another process is changing the store"]
        try:
            return self._recover_locked()
        finally:
            os.close(lock)

    def _recover_locked(self) -> list[str]:
        actions: list[str] = []
        for leftover in list(self.staging_dir.iterdir()):
            _remove(leftover)
            actions.append(f"removed half-written staging {leftover.name}")
        for directory in (self.state_dir, self.models_dir):
            for tmp in directory.glob(".*.tmp-*"):
                _remove(tmp)
                actions.append(f"removed half-written {tmp.name}")
        pointer = self.pointer()
        if pointer["active"] and not self._slot_ok(pointer["active"]):
            # Never expected (the pointer only ever names complete slots), but never leave the device
            # without a model when a previous one is intact.
            fallback = pointer["previous"] if self._slot_ok(pointer["previous"]) else None
            self._write_pointer(fallback, None)
            actions.append(f"active slot {pointer['active']} is damaged; "
                           f"{'fell back to ' + str(fallback) if fallback else 'no model is active'}")
            pointer = {"active": fallback, "previous": None}
        if pointer["previous"] and not self._slot_ok(pointer["previous"]):
            self._write_pointer(pointer["active"], None)
            actions.append(f"previous slot {pointer['previous']} is damaged; forgot it")
            pointer["previous"] = None
        journal = self.journal()
        if journal is not None and journal.get("step") != "done":
            target = journal.get("target")
            completed = bool(target) and pointer["active"] == target
            outcome = ("completed" if completed else "undone")
            journal.update(step="done", outcome=f"{journal.get('kind', 'install')} {outcome} by recovery",
                           recovered_at=time.time())
            journal.setdefault("steps", []).append({"step": "done", "time": time.time()})
            self._write_json(self.journal_path, journal)
            actions.append(f"interrupted {journal.get('kind', 'install')} of slot {target} "
                           f"(after step {journal['steps'][-2]['step'] if len(journal['steps']) > 1 else '?'}) "
                           f"{outcome}")
        actions.extend(self._gc_locked(pointer))
        return actions

    def _gc_locked(self, pointer: dict[str, str | None]) -> list[str]:
        kept = {pointer["active"], pointer["previous"]}
        removed = []
        for path in list(self.models_dir.iterdir()):
            if path.name not in kept:
                _remove(path)
                removed.append(f"removed unused slot {path.name}")
        if removed:
            _fsync_dir(self.models_dir)
        return removed


class Transaction:
    """One install or rollback, holding the store's lock; every step is journaled.

    Use it as a context manager: leaving the block with an exception aborts (the old pointer is
    restored if it had been switched, the new slot removed), leaving it normally finishes.
    """

    def __init__(self, store: ModelStore, lock_fd: int, kind: str, target: str,
                 before: dict[str, str | None], manifest: Manifest) -> None:
        self.store = store
        self.kind = kind
        self.target = target
        self.before = dict(before)
        self.manifest = manifest
        self.manifest_bytes = b""
        self.signature_bytes = b""
        self.switched = False
        self.closed = False
        self._lock_fd = lock_fd
        self._journal: dict[str, Any] = {
            "kind": kind, "target": target, "name": manifest.name, "version": manifest.version,
            "before": self.before, "started_at": time.time(), "steps": [],
        }

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        if exc is not None:
            self.abort(f"{type(exc).__name__}: {exc}")
        else:
            self.finish()

    def record(self, step: str, **details: Any) -> None:
        """Journal ``step`` (atomically), then give the crash tests their chance."""
        if step not in STEPS:
            raise ValueError(f"unknown install step {step!r}")
        self._journal["step"] = step
        self._journal["steps"].append({"step": step, "time": time.time(), **details})
        self.store._write_json(self.store.journal_path, self._journal)
        crash_point(step)

    def stage(self, model: ModelData) -> InstalledModel:
        """Write the slot in staging, fsync it, and move it into place in one rename."""
        if self.kind != "install":
            raise ValueError("only an install stages a model")
        store = self.store
        final = store.models_dir / self.target
        kept = {self.before["active"], self.before["previous"]}
        reuse = final.is_dir() and self.target in kept
        if final.exists() and not reuse:
            _remove(final)  # an unreferenced leftover with this name: never trusted
        if not reuse:
            staging = store.staging_dir / self.target
            _remove(staging)
            staging.mkdir()
            _write_synced(staging / self.manifest.model["filename"], model)
            crash_point("staging")
            _write_synced(staging / MANIFEST_NAME, self.manifest_bytes)
            _write_synced(staging / SIGNATURE_NAME, self.signature_bytes)
            _fsync_dir(staging)
            os.rename(staging, final)
            _fsync_dir(store.models_dir)
            _fsync_dir(store.staging_dir)
        self.record("staged", reused=reuse)
        return store.slot(self.target)

    def activate(self) -> None:
        """The one atomic switch: the target becomes active (an install keeps the old one as previous)."""
        if self.kind == "install":
            previous = self.before["active"] if self.before["active"] != self.target else self.before["previous"]
        else:
            previous = None  # the model rolled back from is dropped: it misbehaved
        self.store._write_pointer(self.target, previous)
        self.switched = True
        crash_point("switched")
        self.record("activated", previous=previous)

    def finish(self, outcome: str = "") -> list[str]:
        """Garbage-collect old slots, journal done, release the lock."""
        try:
            removed = self.store._gc_locked(self.store.pointer())
            self._journal["outcome"] = outcome or ("installed" if self.kind == "install" else "rolled back")
            self.record("done", removed=removed)
            return removed
        finally:
            self._close()

    def abort(self, reason: str) -> None:
        """Undo: restore the pointer if it was switched, remove the new slot, journal done."""
        try:
            if self.switched:
                self.store._write_pointer(self.before["active"], self.before["previous"])
                self.switched = False
            self.store._gc_locked(self.store.pointer())
            self._journal["outcome"] = f"failed: {reason}"
            self.record("done")
        finally:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._lock_fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["STEPS", "CRASH_POINTS", "CRASH_ENV", "crash_point", "InstalledModel", "ModelStore",
           "StoreCorruptError", "Transaction"]
