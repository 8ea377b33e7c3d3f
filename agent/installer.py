"""The install pipeline: decide whether a bundle may be installed, then install it atomically.

Order matters, cheapest and most telling refusal first, nothing written until everything that
can be checked without writing has passed:

    signature -> profile -> agent version -> newer than active -> recipient (encrypted bundles)
    -> free disk and memory -> model hashes -> stage -> load (decrypt in memory, delegate chain)
    -> smoke test -> activate -> on_activate

Every outcome is an :class:`~agent.events.Event` whose reason a person can act on, and a stable
code (``InstallResult.code``, ``InstallError.code``). Any failure leaves the previously active
model active and the store clean; a model that fails its smoke test never becomes active.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

import agent
from agent import events as ev
from agent.errors import InstallError
from agent.events import Event, EventSink, discard
from agent.protocol import bundle as bundle_mod
from agent.protocol import encryption
from agent.protocol.errors import BundleError, SignatureError, TamperedError, TruncatedBundleError
from agent.protocol.keys import PublicKey
from agent.protocol.manifest import Manifest, ModelData, check_model
from agent.protocol.profiles import Profile
from agent.store import InstalledModel, ModelStore, StoreCorruptError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

# Free disk wanted beyond twice the model (staging plus the slot while the old ones still exist).
DEFAULT_DISK_MARGIN_BYTES = 16 * 1024 * 1024

Loader = Callable[..., Any]       # agent.engine.load_model's signature
SmokeTest = Callable[[Any], float]  # agent.engine.smoke_test's signature

# Refusals found before anything is written (DEPLOY_REJECTED) versus failures while installing.
_REJECT_CODES = frozenset({"bad_bundle", "bad_signature", "tampered", "wrong_profile", "agent_too_old",
                           "not_newer", "not_recipient", "too_large", "no_space", "no_memory", "busy"})


@dataclass(frozen=True)
class InstallResult:
    """What an install or rollback did. ``loaded`` is the live model when ``ok`` and no
    ``on_activate`` callback took ownership of it (the caller must ``close()`` it then)."""

    ok: bool
    code: str
    message: str
    manifest: Manifest | None = None
    loaded: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"ok": self.ok, "code": self.code, "message": self.message,
                "name": m.name if m else None, "version": m.version if m else None,
                "sha256": m.sha256 if m else None, **self.details}


def parse_version(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise ValueError(text)
    return tuple(int(p) for p in text.split("."))


class Installer:
    """Installs bundles into a :class:`ModelStore` for one device profile."""

    def __init__(self, store: ModelStore, trusted: Iterable[PublicKey], profile: Profile, *,
                 loader: Loader | None = None, smoke: SmokeTest | None = None,
                 events: EventSink = discard, on_activate: Callable[[Any], None] | None = None,
                 workers: int = 1, disk_margin_bytes: int = DEFAULT_DISK_MARGIN_BYTES,
                 agent_version: str | None = None, decryption_key: X25519PrivateKey | None = None) -> None:
        self.store = store
        self.trusted = list(trusted)
        self.profile = profile
        self._loader = loader
        self._smoke = smoke
        self.events = events
        self.on_activate = on_activate
        self.workers = workers
        self.disk_margin_bytes = disk_margin_bytes
        self.agent_version = agent_version or agent.__version__
        self.decryption_key = decryption_key  # the device's X25519 key: opens bundles encrypted for it

    # entry points ------------------------------------------------------------------------

    def install_file(self, path: str | Path) -> InstallResult:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._refused(InstallError("bad_bundle", f"{path}: bundle file not found"), None, str(path))
        except OSError as exc:
            return self._refused(InstallError("bad_bundle", f"{path}: cannot read bundle ({exc.strerror or exc})"),
                                 None, str(path))
        return self.install_bytes(data, str(path))

    def install_bytes(self, data: bytes, source: str) -> InstallResult:
        """Install a whole bundle file's bytes (``source`` names it in messages)."""
        try:
            parts = bundle_mod.parse_bundle(data)
        except BundleError as exc:
            return self._refused(InstallError("bad_bundle", f"{source}: {exc}"), None, source)
        return self.install_parts(parts.manifest_bytes, parts.signature_bytes, parts.model, source)

    def install_parts(self, manifest_bytes: bytes, signature_bytes: bytes, model: ModelData,
                      source: str) -> InstallResult:
        """Install from the three parts (the MQTT transport assembles them from chunks)."""
        manifest: Manifest | None = None
        try:
            manifest = self.check_manifest(manifest_bytes, signature_bytes)
            self.precheck(manifest)
            try:
                check_model(manifest, model)
            except TamperedError as exc:
                raise InstallError("tampered", f"{exc}: the bundle was altered or damaged in transit; "
                                               f"fetch it again") from None
        except InstallError as exc:
            return self._refused(exc, manifest, source)
        return self._install(manifest, manifest_bytes, signature_bytes, model, source)

    # checks (no writes) ------------------------------------------------------------------

    def check_manifest(self, manifest_bytes: bytes, signature_bytes: bytes) -> Manifest:
        """Signature, profile, agent version and version order; raise InstallError with a code."""
        try:
            manifest, _signer = bundle_mod.verify_manifest(manifest_bytes, signature_bytes, self.trusted)
        except SignatureError as exc:
            raise InstallError("bad_signature", f"{exc}; install only bundles signed by a trusted release key "
                                                f"({len([k for k in self.trusted if k.role == 'release'])} trusted)") from None
        except BundleError as exc:
            raise InstallError("bad_bundle", str(exc)) from None
        if manifest.profile != self.profile.name:
            raise InstallError("wrong_profile", f"{manifest.name} v{manifest.version} was built for profile "
                                                f"{manifest.profile!r}, this device runs {self.profile.name!r}; "
                                                f"convert the model for {self.profile.name}")
        try:
            too_old = parse_version(manifest.min_agent_version) > parse_version(self.agent_version)
        except ValueError:
            raise InstallError("bad_bundle", f"manifest min_agent_version {manifest.min_agent_version!r} is not a "
                                             f"version like 0.1.0") from None
        if too_old:
            raise InstallError("agent_too_old", f"{manifest.name} v{manifest.version} needs agent "
                                                f"{manifest.min_agent_version} or newer, this is "
                                                f"{self.agent_version}; upgrade litefleet-agent first")
        active = self._active()
        if active is not None and manifest.version <= active.manifest.version:
            same = " (it is already active)" if manifest.version == active.manifest.version else ""
            raise InstallError("not_newer", f"{manifest.name} v{manifest.version} is not newer than the active "
                                            f"{active.manifest.name} v{active.manifest.version}{same}; "
                                            f"to go back use a rollback, or release a higher version")
        if encryption.is_encrypted(manifest):
            self._content_key(manifest)  # a device that may not open it says so before fetching a chunk
        return manifest

    def _content_key(self, manifest: Manifest) -> bytes:
        if self.decryption_key is None:
            raise InstallError("not_recipient", f"{manifest.name} v{manifest.version} is encrypted and this device "
                                                f"has no X25519 key (x25519_key_file in agent.toml); "
                                                f"`litefleet-agent install` makes one")
        try:
            return encryption.unwrap(manifest, self.decryption_key)
        except encryption.NotRecipientError as exc:
            raise InstallError("not_recipient", f"this device is not a recipient: {exc}; re-wrap the bundle for "
                                                f"this device's key (`litefleet fleet keys`, then `litefleet "
                                                f"bundle rewrap`)") from None
        except BundleError as exc:
            raise InstallError("bad_bundle", str(exc)) from None

    def plaintext(self, manifest: Manifest, model: bytes) -> bytes:
        """The model to hand to the interpreter: decrypted in memory when the bundle is encrypted
        (``model`` must already match the signed ciphertext hashes)."""
        if not encryption.is_encrypted(manifest):
            return model
        try:
            return encryption.decrypt_with(manifest, model, self._content_key(manifest))
        except encryption.DecryptionError as exc:
            raise InstallError("decrypt_failed", str(exc)) from None

    def precheck(self, manifest: Manifest) -> None:
        """Refuse before anything is downloaded or staged when the device cannot hold the model."""
        budget = int(self.profile.budgets.get("max_model_bytes", 0))
        if budget and manifest.size > budget:
            raise InstallError("too_large", f"model is {manifest.size} bytes, over profile {self.profile.name}'s "
                                            f"max_model_bytes {budget}")
        needed_disk = manifest.size * 2 + self.disk_margin_bytes
        free_disk = shutil.disk_usage(self.store.state_dir).free
        if free_disk < needed_disk:
            raise InstallError("no_space", f"{self.store.state_dir} has {_mb(free_disk)} free, installing this "
                                           f"{_mb(manifest.size)} model needs {_mb(needed_disk)} (2 x model + "
                                           f"{_mb(self.disk_margin_bytes)} margin); free disk space")
        peak = int(manifest.doc["estimates"]["peak_memory_bytes"])
        available = psutil.virtual_memory().available
        if peak > available:
            raise InstallError("no_memory", f"the model needs about {_mb(peak)} of memory "
                                            f"(manifest estimates.peak_memory_bytes), {_mb(available)} is "
                                            f"available; stop other programs or use a smaller model")

    # the install -------------------------------------------------------------------------

    def _install(self, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes, model: ModelData,
                 source: str) -> InstallResult:
        try:
            txn = self.store.begin_install(manifest, manifest_bytes, signature_bytes)
        except InstallError as exc:
            return self._refused(exc, manifest, source)
        previous = self._active()
        loaded = None
        diff = float("nan")
        try:
            with txn:
                installed = txn.stage(model)
                loaded = self._load(installed)
                txn.record("loaded", delegate=_delegate(loaded))
                diff = self._smoke_test(loaded, manifest)
                txn.record("smoke_ok", max_abs_diff=diff)
                txn.activate()
                self._hand_over(loaded)
        except InstallError as exc:
            _close(loaded)
            return self._failed(exc, manifest, source)
        except Exception as exc:  # disk errors and the like
            if txn.switched:  # the switch happened and only the bookkeeping after it failed
                return self._installed(manifest, source, txn.target, loaded, previous, diff,
                                       f"; warning: finishing the journal failed ({exc})")
            _close(loaded)
            return self._failed(InstallError("store_failed", f"install of {manifest.name} v{manifest.version} "
                                                             f"failed while writing the store: {exc}"), manifest, source)
        return self._installed(manifest, source, txn.target, loaded, previous, diff)

    def _installed(self, manifest: Manifest, source: str, slot: str, loaded: Any,
                   previous: InstalledModel | None, diff: float, note: str = "") -> InstallResult:
        details = {"source": source, "slot": slot, "max_abs_diff": diff, "engine": _report(loaded),
                   "previous": previous.describe() if previous else None}
        message = (f"installed {manifest.name} v{manifest.version} ({manifest.sha256[:12]}) on "
                   f"{_delegate(loaded)}; smoke test max diff {diff:.3g}"
                   + (f"; v{previous.manifest.version} kept for rollback" if previous else "") + note)
        self.events(Event(ev.INSTALLED, message, {"code": "installed", **_ids(manifest), **details}))
        return InstallResult(True, "installed", message, manifest,
                             None if self.on_activate else loaded, details)

    def rollback(self, reason: str, *, if_active: tuple[str, int] | None = None) -> InstallResult:
        """Make the previous model active again (re-verified, loaded and smoke-tested first).

        ``if_active`` (model name, version): roll back only from that model. A rollout that
        lost sight of a device asks this way, so a device that already went back on its own
        is not sent one step further back.
        """
        active = self._active()
        if if_active is not None and (active is None or
                                      (active.manifest.name, active.manifest.version) != tuple(if_active)):
            running = f"{active.manifest.name} v{active.manifest.version}" if active else "no model"
            message = (f"rollback not needed ({reason}): the active model is {running}, "
                       f"not {if_active[0]} v{if_active[1]}")
            self.events(Event(ev.ROLLBACK_SKIPPED, message, {"code": "not_active", "operation": "rollback"}))
            return InstallResult(True, "not_active", message, active.manifest if active else None, None,
                                 {"operation": "rollback"})
        try:
            txn = self.store.begin_rollback()
        except InstallError as exc:
            message = f"cannot roll back ({reason}): {exc}"
            self.events(Event(ev.INSTALL_FAILED, message, {"code": exc.code, "operation": "rollback"}))
            return InstallResult(False, exc.code, message, None, None, {"operation": "rollback"})
        target = txn.manifest
        loaded = None
        try:
            with txn:
                installed = self.store.slot(txn.target)
                try:
                    installed.read_verified(self.trusted)
                except BundleError as exc:
                    raise InstallError("tampered", f"the stored previous model {installed.directory} no longer "
                                                   f"verifies: {exc}") from None
                loaded = self._load(installed)
                txn.record("loaded", delegate=_delegate(loaded))
                diff = self._smoke_test(loaded, target)
                txn.record("smoke_ok", max_abs_diff=diff)
                txn.activate()
                self._hand_over(loaded)
        except InstallError as exc:
            _close(loaded)
            message = f"rollback to {target.name} v{target.version} failed, the active model stays: {exc}"
            self.events(Event(ev.INSTALL_FAILED, message, {"code": exc.code, "operation": "rollback",
                                                           **_ids(target)}))
            return InstallResult(False, exc.code, message, target, None, {"operation": "rollback"})
        except Exception as exc:
            _close(loaded)
            message = f"rollback to {target.name} v{target.version} failed, the active model stays: {exc}"
            self.events(Event(ev.INSTALL_FAILED, message, {"code": "store_failed", "operation": "rollback"}))
            return InstallResult(False, "store_failed", message, target, None, {"operation": "rollback"})
        came_from = f" from v{active.manifest.version}" if active else ""
        message = f"rolled back{came_from} to {target.name} v{target.version}: {reason}"
        details = {"operation": "rollback", "reason": reason,
                   "from": active.describe() if active else None, "engine": _report(loaded)}
        self.events(Event(ev.ROLLED_BACK, message, {"code": "rolled_back", **_ids(target), **details}))
        return InstallResult(True, "rolled_back", message, target, None if self.on_activate else loaded, details)

    # steps -------------------------------------------------------------------------------

    def _load(self, installed: InstalledModel) -> Any:
        model = installed.read_model()
        if hashlib.sha256(model).hexdigest() != installed.manifest.sha256:
            raise InstallError("tampered", f"{installed.model_path} does not match its manifest after writing; "
                                           f"the disk may be failing")
        model = self.plaintext(installed.manifest, model)
        loader = self._loader
        if loader is None:
            from agent.engine import load_model
            loader = load_model
        try:
            return loader(model, installed.manifest, self.profile, workers=self.workers, events=self.events)
        except Exception as exc:
            raise InstallError("load_failed", f"{installed.manifest.name} v{installed.manifest.version} cannot "
                                              f"be loaded on this device: {exc}") from None

    def _smoke_test(self, loaded: Any, manifest: Manifest) -> float:
        smoke = self._smoke
        if smoke is None:
            from agent.engine import smoke_test
            smoke = smoke_test
        try:
            return float(smoke(loaded))
        except Exception as exc:
            raise InstallError("smoke_test_failed", f"{manifest.name} v{manifest.version} failed its smoke test "
                                                    f"on this device ({exc}); it was not activated") from None

    def _hand_over(self, loaded: Any) -> None:
        if self.on_activate is None:
            return
        try:
            self.on_activate(loaded)
        except Exception as exc:
            raise InstallError("activate_failed", f"the new model could not be put into service ({exc}); "
                                                  f"the previous model was restored") from None

    def _active(self) -> InstalledModel | None:
        try:
            return self.store.active()
        except StoreCorruptError:
            return None

    # outcomes ----------------------------------------------------------------------------

    def _refused(self, exc: InstallError, manifest: Manifest | None, source: str) -> InstallResult:
        kind = ev.DEPLOY_REJECTED if exc.code in _REJECT_CODES else ev.INSTALL_FAILED
        details = {"code": exc.code, "source": source, **(_ids(manifest) if manifest else {})}
        self.events(Event(kind, str(exc), details))
        return InstallResult(False, exc.code, str(exc), manifest, None, {"source": source})

    def _failed(self, exc: InstallError, manifest: Manifest, source: str) -> InstallResult:
        active = self._active()
        kept = (f"; {active.manifest.name} v{active.manifest.version} stays active" if active
                else "; no model is active")
        message = f"{exc}{kept}"
        self.events(Event(ev.INSTALL_FAILED, message, {"code": exc.code, "source": source, **_ids(manifest)}))
        return InstallResult(False, exc.code, message, manifest, None, {"source": source})


def _ids(manifest: Manifest) -> dict[str, Any]:
    return {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256}


def _delegate(loaded: Any) -> str:
    report = getattr(loaded, "report", None)
    return str(getattr(report, "delegate", "cpu"))


def _report(loaded: Any) -> dict[str, Any]:
    report = getattr(loaded, "report", None)
    return report.to_dict() if hasattr(report, "to_dict") else {}


def _close(loaded: Any) -> None:
    if loaded is not None and hasattr(loaded, "close"):
        try:
            loaded.close()
        except Exception:
            pass


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


__all__ = ["Installer", "InstallResult", "DEFAULT_DISK_MARGIN_BYTES", "parse_version"]
