"""Rollout state in the fleet store (tables of migration 0010), through the store's DB adapter.

Why here and not in memory: a server restarted mid-rollout must carry on where it was, and two
rollouts must not fight over one device, also when two server processes share one PostgreSQL.
So the state is saved after every step, creation happens in one locked transaction that sees
every other rollout's devices, and the database itself refuses a second owner of a device
(partial unique index on ``rollout_devices(device_id) WHERE owner = 1``).

Concurrency: the runner and the HTTP API (pause/resume/abort) both write. Every save checks and
bumps ``revision``; a writer that lost the race gets :class:`RolloutConflict`, reloads, retries.
Only device rows whose content changed are rewritten (a big fleet's rollout saves cheaply).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fleet.db import StoreError, Tx
from fleet.rollout import (FINAL_STATES, D_EXCLUDED, DeviceObs, DeviceRecord, RolloutError, RolloutMachine,
                           RolloutSpec, RolloutState, plan, state_from_dict)

_STATE_KEYS = ("state", "stage_index", "stage_counts", "stage_started_at", "soak_started_at", "reason",
               "updated_at", "breach", "then", "history", "health")
MAX_HISTORY = 200


class RolloutConflict(StoreError):
    """Someone else saved this rollout since it was loaded: reload and try again."""


class RolloutNotFound(StoreError):
    """No rollout with that id."""


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str)


def _progress(spec: dict[str, Any], head: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """A list row's stage, sizes, versions and verdict from the stored spec and state (no device rows)."""
    stage_counts = [int(n) for n in head.get("stage_counts") or []]
    index = int(head.get("stage_index") or 0)
    return {"stage": index + 1 if stage_counts else 0, "stages": len(stage_counts), "stage_counts": stage_counts,
            "stage_target": stage_counts[min(index, len(stage_counts) - 1)] if stage_counts else 0,
            "target_devices": sum(n for state, n in counts.items() if state != D_EXCLUDED),
            "versions": {p: b.get("version") for p, b in (spec.get("bundles") or {}).items()},
            "breach": head.get("breach", ""), "health": head.get("health") or {},
            "soak_s": spec.get("soak_s"), "stage_started_at": head.get("stage_started_at"),
            "soak_started_at": head.get("soak_started_at"), "devices_by_state": counts}


class RolloutStore:
    """Load, create and save rollouts on a :class:`fleet.store.Store` (or anything with ``.db``)."""

    def __init__(self, store: Any) -> None:
        self.db = store.db

    # create ------------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, targets: list[DeviceObs], now: float) -> RolloutState:
        """Plan and insert a rollout atomically; devices held by another rollout are excluded."""
        spec.check()
        with self.db.transaction(write=True) as tx:
            self.db.lock_for(tx, "lf-rollout")
            if tx.query("SELECT 1 FROM rollouts WHERE id = ?", (spec.id,)):
                raise RolloutError(f"a rollout with id {spec.id!r} already exists")
            busy = self._busy(tx, None)
            state = plan(spec, targets, busy, now)
            state.revision = 1
            tx.execute("INSERT INTO rollouts (id, fleet, model, target, state, reason, created_at, updated_at, "
                       "revision, spec_json, state_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (spec.id, spec.fleet, spec.model, spec.target, state.state, state.reason, spec.created_at,
                        now, state.revision, _dumps(state.to_dict()["spec"]), _dumps(self._head(state))))
            tx.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, profile, ord, state, stage, owner, command_id, "
                "rollback_command_id, reason, record_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [self._device_row(state, r) for r in state.devices.values()])
        self._remember(state)
        return state

    # read --------------------------------------------------------------------------------

    def load(self, rollout_id: str) -> RolloutState:
        with self.db.transaction(snapshot=True) as tx:
            rows = tx.query("SELECT spec_json, state_json, revision FROM rollouts WHERE id = ?", (rollout_id,))
            if not rows:
                raise RolloutNotFound(f"no rollout {rollout_id!r} (see `litefleet rollout list`)")
            devices = tx.query("SELECT record_json FROM rollout_devices WHERE rollout_id = ?", (rollout_id,))
        spec_json, state_json, revision = rows[0]
        doc = {**json.loads(state_json), "spec": json.loads(spec_json), "revision": int(revision),
               "devices": [json.loads(r[0]) for r in devices]}
        state = state_from_dict(doc)
        self._remember(state)
        return state

    def list(self, *, states: tuple[str, ...] | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Summaries, newest first: the fields of :meth:`RolloutState.summary` (stage of N, versions, breach,
        last health verdict) plus the stage sizes and soak times a progress view needs, read without the
        device rows (cheap for a list the dashboard polls)."""
        where, params = "", []
        if states:
            where = f" WHERE state IN ({','.join('?' * len(states))})"
            params = list(states)
        with self.db.transaction() as tx:
            rows = tx.query_dicts("SELECT id, fleet, model, target, state, reason, created_at, updated_at, "
                                  f"revision, spec_json, state_json FROM rollouts{where} "
                                  "ORDER BY created_at DESC, id LIMIT ?", params + [int(limit)])
            counts = tx.query("SELECT rollout_id, state, COUNT(*) FROM rollout_devices GROUP BY rollout_id, state")
        by: dict[str, dict[str, int]] = {}
        for rid, st, n in counts:
            by.setdefault(rid, {})[st] = int(n)
        for row in rows:
            spec, head = json.loads(row.pop("spec_json")), json.loads(row.pop("state_json"))
            row.update(_progress(spec, head, by.get(row["id"], {})))
        return rows

    def active_ids(self) -> list[str]:
        """Rollouts the runner must step (not paused, not finished)."""
        from fleet.rollout import ACTIVE_STATES
        with self.db.transaction() as tx:
            rows = tx.query(f"SELECT id FROM rollouts WHERE state IN ({','.join('?' * len(ACTIVE_STATES))}) "
                            "ORDER BY created_at", list(ACTIVE_STATES))
        return [r[0] for r in rows]

    def busy_devices(self, exclude: str | None = None) -> dict[str, str]:
        """device id -> the rollout holding it."""
        with self.db.transaction() as tx:
            return self._busy(tx, exclude)

    @staticmethod
    def _busy(tx: Tx, exclude: str | None) -> dict[str, str]:
        rows = tx.query("SELECT device_id, rollout_id FROM rollout_devices WHERE owner = 1")
        return {d: r for d, r in rows if r != exclude}

    # write -------------------------------------------------------------------------------

    def save(self, state: RolloutState) -> None:
        """Write what changed; :class:`RolloutConflict` if someone saved it since it was loaded."""
        state.history = state.history[-MAX_HISTORY:]
        seen: dict[str, str] = getattr(state, "_saved_rows", {})
        with self.db.transaction(write=True) as tx:
            tx.execute("UPDATE rollouts SET state = ?, reason = ?, updated_at = ?, revision = ?, state_json = ? "
                       "WHERE id = ? AND revision = ?",
                       (state.state, state.reason, state.updated_at, state.revision + 1, _dumps(self._head(state)),
                        state.id, state.revision))
            if tx.rowcount != 1:
                raise RolloutConflict(f"rollout {state.id} was changed by someone else since it was loaded")
            changed = []
            for record in state.devices.values():
                row = self._device_row(state, record)
                if seen.get(record.device_id) != row[-1] or state.state in FINAL_STATES:
                    changed.append(row[2:] + row[:2])
            tx.executemany(
                "UPDATE rollout_devices SET profile = ?, ord = ?, state = ?, stage = ?, owner = ?, command_id = ?, "
                "rollback_command_id = ?, reason = ?, record_json = ? WHERE rollout_id = ? AND device_id = ?",
                changed)
        state.revision += 1
        self._remember(state)

    def update(self, rollout_id: str, change: Callable[[RolloutMachine], None], *, attempts: int = 5) -> RolloutState:
        """Load, apply ``change`` to its machine, save; retried when the runner saved in between."""
        for _ in range(attempts):
            state = self.load(rollout_id)
            change(RolloutMachine(state))
            try:
                self.save(state)
                return state
            except RolloutConflict:
                continue
        raise RolloutConflict(f"rollout {rollout_id} keeps changing under this request; try again")

    # rows ----------------------------------------------------------------------------------

    @staticmethod
    def _head(state: RolloutState) -> dict[str, Any]:
        doc = state.to_dict()
        return {k: doc[k] for k in _STATE_KEYS}

    @staticmethod
    def _device_row(state: RolloutState, r: DeviceRecord) -> tuple:
        owner = 1 if (r.state != D_EXCLUDED and state.state not in FINAL_STATES) else 0
        return (state.id, r.device_id, r.profile, r.order, r.state, r.stage, owner, r.command_id,
                r.rollback_command_id, r.reason, _dumps(r.to_dict()))

    def _remember(self, state: RolloutState) -> None:
        state._saved_rows = {r.device_id: self._device_row(state, r)[-1]  # type: ignore[attr-defined]
                             for r in state.devices.values()}


__all__ = ["RolloutStore", "RolloutConflict", "RolloutNotFound"]
