"""``litefleet fleet status``, ``fleet device``, ``fleet keys`` and ``fleet quality``: the fleet at a glance,
from the server's API.

Why through the HTTP API and not the database: the operator's laptop rarely reaches the
server's database, and the API is the one place that applies the token. Every failure (server
down, wrong token, unknown device) is one line naming what to do, and a non-zero exit.

``--watch`` redraws the table in place (rich Live) on a terminal until Ctrl-C; when stdout is
not a terminal (a pipe, a log file) Live cannot redraw, so each refresh is printed as its own
block instead, and ``--json --watch`` prints one JSON document per line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.protocol.errors import LitefleetError

DEFAULT_SERVER = "http://127.0.0.1:8600"
SPARK = "▁▂▃▄▅▆▇█"


class FleetApiError(LitefleetError):
    """The fleet server could not be asked, or refused: the message says why and what to do."""

    exit_code = 1


class AuthError(FleetApiError):
    """The token is missing or wrong; retrying with the same token never helps."""


# Client -----------------------------------------------------------------------------------

def default_token_file() -> Path:
    """``$LITEFLEET_TOKEN_FILE``, else ``api-token`` in ``$LITEFLEET_DATA_DIR`` or ``~/.local/share/litefleet``."""
    if os.environ.get("LITEFLEET_TOKEN_FILE"):
        return Path(os.environ["LITEFLEET_TOKEN_FILE"])
    data_dir = os.environ.get("LITEFLEET_DATA_DIR") or Path.home() / ".local" / "share" / "litefleet"
    return Path(data_dir) / "api-token"


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise AuthError(f"token file {path} not found: pass --token-file <server data dir>/api-token "
                        f"(the server writes it on first start)") from None
    except OSError as exc:
        raise AuthError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise AuthError(f"token file {path} is empty")
    return token


class ApiClient:
    """GET JSON from the fleet server with the bearer token; errors become :class:`FleetApiError`."""

    def __init__(self, server: str, token: str, *, token_source: str = "", timeout: float = 10.0) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.token_source = token_source
        self.timeout = timeout

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = f"{self.server}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}",
                                                       "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc)
            if exc.code == 401:
                source = f" from {self.token_source}" if self.token_source else ""
                raise AuthError(f"the fleet server at {self.server} refused the token{source}: {message}") from None
            raise FleetApiError(f"{self.server}{path}: HTTP {exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
            raise FleetApiError(f"cannot reach the fleet server at {self.server}: {reason} (is `litefleet server` "
                                f"running? pass --server URL)") from None
        except (TimeoutError, OSError) as exc:
            raise FleetApiError(f"cannot reach the fleet server at {self.server}: {exc}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise FleetApiError(f"{url}: the answer is not JSON (is {self.server} a litefleet server?)") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error") or exc.reason)
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def client_from_args(args: argparse.Namespace) -> ApiClient:
    env_token = os.environ.get("LITEFLEET_API_TOKEN")
    if args.token_file is None and env_token:
        return ApiClient(args.server, env_token, token_source="$LITEFLEET_API_TOKEN")
    path = args.token_file or default_token_file()
    return ApiClient(args.server, read_token(path), token_source=str(path))


# Formatting (pure) ------------------------------------------------------------------------

def ago(ts: float | None, now: float) -> str:
    """``3 s ago``, ``5 min ago``, ``2 h ago``, ``4 d ago``; ``never`` without a time."""
    if ts is None:
        return "never"
    s = max(now - float(ts), 0.0)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    if s < 36 * 3600:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def num(value: Any, fmt: str = "{:.1f}", unit: str = "") -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(float(value)) + unit
    except (TypeError, ValueError):
        return str(value)


def model_text(model: Mapping[str, Any] | None) -> str:
    if not model:
        return "-"
    return f"{model.get('name') or '?'} v{model.get('version')}"


def pending_text(pending: Any) -> str:
    if not pending:
        return "-"
    if isinstance(pending, Mapping):
        version = pending.get("version") or (pending.get("details") or {}).get("version")
        what = pending.get("kind") or pending.get("state") or "pending"
        percent = pending.get("percent") or (pending.get("details") or {}).get("percent")
        parts = [f"v{version}" if version is not None else "", str(what).replace("deploy_", ""),
                 f"{float(percent):.0f}%" if percent is not None else ""]
        return " ".join(p for p in parts if p) or "pending"
    return str(pending)


def pick(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def sparkline(values: Sequence[float | None]) -> str:
    """One block character per value, scaled between the series' min and max; gaps as spaces."""
    present = [v for v in values if v is not None]
    if not present:
        return ""
    lo, hi = min(present), max(present)
    span = hi - lo
    return "".join(" " if v is None else SPARK[0 if span == 0 else min(int((v - lo) / span * len(SPARK)),
                                                                        len(SPARK) - 1)]
                   for v in values)


def downsample(values: list[Any], width: int) -> list[Any]:
    """At most ``width`` values: the mean of each bucket (None where a bucket has no value)."""
    if len(values) <= width:
        return values
    out = []
    for i in range(width):
        bucket = [v for v in values[i * len(values) // width:(i + 1) * len(values) // width] if v is not None]
        out.append(sum(bucket) / len(bucket) if bucket else None)
    return out


def drift_text(drift: Mapping[str, Any] | None, threshold: Any) -> Any:
    """The drift column: the score, red and marked ``!`` when over the server's threshold."""
    from rich.text import Text
    score = (drift or {}).get("score")
    if score is None:
        return Text("-")
    over = threshold is not None and float(score) > float(threshold)
    return Text(f"{float(score):.2f}" + (" !" if over else ""), style="bold red" if over else "")


def summary_text(summary: Mapping[str, Any], shown: int | None = None) -> str:
    total = summary.get("total", 0)
    parts = [f"{summary.get('online', 0)} online / {summary.get('offline', 0)} offline of {total} device(s)"]
    alerts = summary.get("alerts", 0)
    kinds = summary.get("alerts_by_kind") or {}
    parts.append(f"alerts: {alerts}" + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"
                                       if kinds else ""))
    parts.append(f"pending deployments: {summary.get('pending_deployments', 0)}")
    parts.append(f"messages lost: {summary.get('lost', 0)}")
    if summary.get("drift_threshold") is not None:
        parts.append(f"drifting: {summary.get('drifting', 0)} (drift > {float(summary['drift_threshold']):g})")
    if shown is not None and shown < total:
        parts.append(f"showing {shown}")
    return " · ".join(parts)


def status_renderable(doc: Mapping[str, Any], alerts: list[Mapping[str, Any]], *, limit: int | None = None,
                      stamp: str = "") -> Any:
    """The status table and its summary line as one rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = float(doc.get("summary", {}).get("time") or time.time())
    threshold = doc.get("summary", {}).get("drift_threshold")
    devices = sorted(doc.get("devices", []), key=lambda d: str(d.get("device_id")))
    shown = devices[:limit] if limit else devices
    alert_kinds: dict[str, set[str]] = {}
    for a in alerts:
        alert_kinds.setdefault(str(a.get("device_id")), set()).add(str(a.get("kind")))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("device", "left"), ("state", "left"), ("last seen", "right"), ("model", "left"),
                            ("delegate", "left"), ("p95 ms", "right"), ("inf/s", "right"), ("CPU %", "right"),
                            ("temp °C", "right"), ("drift", "right"), ("pending", "left"), ("lost", "right"),
                            ("alerts", "left")):
        table.add_column(column, justify=justify, no_wrap=column in ("device", "last seen"))
    for d in shown:
        kinds = alert_kinds.get(str(d.get("device_id")), set())
        online = bool(d.get("online"))
        lost = int(d.get("lost") or 0)
        table.add_row(
            str(d.get("device_id")),
            Text("online", style="green") if online else Text("offline", style="bold red"),
            ago(d.get("last_seen"), now),
            model_text(d.get("model")),
            str(d.get("delegate") or "-"),
            Text(num(d.get("p95_ms"), "{:.2f}"), style="red" if "latency_regression" in kinds else ""),
            num(d.get("inferences_per_s")),
            num(d.get("cpu_percent"), "{:.0f}"),
            Text(num(d.get("temperature_c")), style="red" if "temperature" in kinds else ""),
            drift_text(d.get("drift"), threshold),
            pending_text(d.get("pending_deployment")),
            Text(str(lost), style="yellow" if lost else ""),
            Text(", ".join(sorted(kinds)) or "-", style="red" if kinds else ""),
        )
    line = summary_text(doc.get("summary", {}), len(shown))
    summary = Text(line + (f" · updated {stamp}" if stamp else ""), style="bold")
    return Group(table, summary)


# Commands ---------------------------------------------------------------------------------

def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("LITEFLEET_SERVER", DEFAULT_SERVER), metavar="URL",
                   help="the fleet server's API (default: $LITEFLEET_SERVER or %(default)s)")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="the API token (default: $LITEFLEET_API_TOKEN, $LITEFLEET_TOKEN_FILE, or api-token in "
                        "$LITEFLEET_DATA_DIR or ~/.local/share/litefleet)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="HTTP timeout (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    f = subparsers.add_parser("fleet", help="watch the fleet: status table, one device's history, device keys, "
                                             "model quality")
    sub = f.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    s = sub.add_parser("status", help="one line per device: state, model, latency, load, pending deployment",
                       description="Show every device the fleet server knows, with a summary line.")
    _add_server_options(s)
    s.add_argument("--group", help="only devices in this group")
    s.add_argument("--profile", help="only devices of this profile")
    s.add_argument("--json", action="store_true", help="print the API's JSON")
    s.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    s.add_argument("--interval", type=float, default=2.0, metavar="S", help="--watch refresh period (default: 2)")
    s.add_argument("--limit", type=int, default=0, metavar="N",
                   help="show at most N devices (default: all; --watch on a terminal: what fits)")
    s.set_defaults(func=_status)
    d = sub.add_parser("device", help="one device's recent history: telemetry, events, alerts")
    _add_server_options(d)
    d.add_argument("device_id", metavar="ID")
    d.add_argument("--since", type=float, default=3600.0, metavar="S", help="history window (default: 3600 s)")
    d.add_argument("--json", action="store_true", help="print the API's JSON")
    d.set_defaults(func=_device)
    q = sub.add_parser("quality", help="a model's quality in the field: drift, accuracy from feedback labels",
                       description="Per version of model NAME: how many devices report drift over the server's "
                                   "threshold, and the accuracy, per-class precision, recall and F1 of the labels "
                                   "the devices' applications sent back, beside the converter's figures from the "
                                   "bundle's manifest. docs/quality.md explains the measures.")
    _add_server_options(q)
    q.add_argument("name", metavar="NAME", help="model name (as in the manifest)")
    q.add_argument("--version", type=_version_arg, metavar="V",
                   help="one version in detail (default: every version with reports, the newest in detail)")
    q.add_argument("--json", action="store_true", help="print the API's JSON")
    q.set_defaults(func=_quality)
    k = sub.add_parser("keys", help="devices' X25519 public keys, to encrypt bundles for",
                       description="List the devices that reported an X25519 public key in their birth message. "
                                   "`--json > keys.json` writes what `litefleet convert --encrypt-for keys.json` "
                                   "and `litefleet bundle encrypt|rewrap --encrypt-for keys.json` read.")
    _add_server_options(k)
    k.add_argument("--group", help="only devices in this group")
    k.add_argument("--profile", help="only devices of this profile")
    k.add_argument("--json", action="store_true", help="print the API's JSON (the --encrypt-for input)")
    k.set_defaults(func=_keys)


def _console() -> Any:
    from rich.console import Console
    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 200
    return Console(width=width, highlight=False)


def _fetch_status(client: ApiClient, args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    doc = client.get("/api/v1/devices", {"group": args.group, "profile": args.profile})
    alerts = client.get("/api/v1/alerts", {"limit": 10_000}).get("alerts", [])
    return doc, alerts


def _status(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise FleetApiError("--interval must be positive")
    client = client_from_args(args)
    client.timeout = args.timeout
    if not args.watch:
        doc, alerts = _fetch_status(client, args)
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        else:
            _console().print(status_renderable(doc, alerts, limit=args.limit or None))
        return 0
    try:
        return _watch(client, args)
    except KeyboardInterrupt:
        return 0


def _watch(client: ApiClient, args: argparse.Namespace) -> int:
    """Refresh every ``--interval`` until Ctrl-C. A server that goes away is shown and retried; a bad token stops."""
    from rich.text import Text
    console = _console()

    def frame() -> Any:
        stamp = time.strftime("%H:%M:%S")
        try:
            doc, alerts = _fetch_status(client, args)
        except AuthError:
            raise
        except FleetApiError as exc:
            return None, Text(f"{exc} · retrying every {args.interval:g} s · {stamp}", style="bold red")
        limit = args.limit or (max(console.size.height - 4, 5) if console.is_terminal else None)
        return doc, status_renderable(doc, alerts, limit=limit, stamp=stamp)

    if args.json:
        while True:
            doc, rendered = frame()
            print(json.dumps(doc, sort_keys=True) if doc is not None else json.dumps({"error": rendered.plain}),
                  flush=True)
            time.sleep(args.interval)
    if not console.is_terminal:
        while True:
            _, rendered = frame()
            console.print(rendered)
            console.print()
            sys.stdout.flush()
            time.sleep(args.interval)
    from rich.live import Live
    with Live(frame()[1], console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(args.interval)
            live.update(frame()[1], refresh=True)


def _device(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    path = "/api/v1/devices/" + urllib.parse.quote(args.device_id, safe="")
    try:
        doc = client.get(path, {"since": -abs(args.since)})
    except FleetApiError as exc:
        if "HTTP 404" in str(exc):
            raise FleetApiError(f"unknown device {args.device_id!r}: `litefleet fleet status` lists the devices "
                                f"the server knows") from None
        raise
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    _console().print(device_renderable(doc, args.since))
    return 0


def _keys(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    doc = client.get("/api/v1/keys", {"group": args.group, "profile": args.profile})
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    from rich.table import Table
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("device", "profile", "state", "key id", "x25519 public key"):
        table.add_column(column, no_wrap=True)
    for d in doc.get("keys", []):
        table.add_row(str(d.get("device_id")), str(d.get("profile") or "-"), "online" if d.get("online") else "offline",
                      str(d.get("key_id")), str(d.get("x25519")))
    console = _console()
    console.print(table)
    without = doc.get("without_key") or []
    note = f"; without one (agent without x25519_key_file, or older): {', '.join(without)}" if without else ""
    console.print(f"{len(doc.get('keys', []))} device(s) with a key{note}")
    return 0


def _version_arg(text: str) -> int:
    try:
        value = int(text.removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a version number such as 3 or v3, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"versions start at 1, got {value}")
    return value


def _quality(args: argparse.Namespace) -> int:
    client = client_from_args(args)
    client.timeout = args.timeout
    name = args.name
    if args.version is None:
        listing = client.get("/api/v1/quality", {"model": name})
        versions = [m for m in listing.get("models", []) if m.get("name") == name]
        if not versions:
            raise FleetApiError(f"no device has reported drift or feedback for model {name!r} yet (is the name "
                                f"right? `litefleet fleet status` shows the models devices run)")
        newest = max(int(m["version"]) for m in versions)
    else:
        listing, versions, newest = None, [], args.version
    path = f"/api/v1/models/{urllib.parse.quote(name, safe='')}/versions/{newest}/quality"
    try:
        detail = client.get(path)
    except FleetApiError as exc:
        if "HTTP 404" in str(exc):
            raise FleetApiError(f"no quality reports for {name} v{newest} and no such bundle in the server's "
                                f"repository") from None
        raise
    if args.json:
        doc = detail if listing is None else {**listing, "detail": detail}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    _console().print(quality_renderable(detail, versions))
    return 0


def _pct(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value) * 100:.{digits}f}%"


def quality_renderable(detail: Mapping[str, Any], versions: Sequence[Mapping[str, Any]] = ()) -> Any:
    """Versions side by side, then one version in detail: drift, field accuracy vs the converter's, per class."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if versions:
        t = Table(box=None, header_style="bold", pad_edge=False, title=f"{detail.get('name')}: versions",
                  title_justify="left")
        for column in ("version", "drift devices", "drifting", "median drift", "labels", "field accuracy",
                       "converter accuracy", "delta"):
            t.add_column(column, justify="left" if column == "version" else "right")
        for m in sorted(versions, key=lambda m: -int(m["version"])):
            drift, field = m.get("drift") or {}, m.get("field") or {}
            drifting = len(drift.get("drifting") or [])
            delta = m.get("accuracy_delta_points")
            t.add_row(f"v{m['version']}", str(drift.get("devices", 0)),
                      Text(str(drifting), style="bold red" if drifting else ""), num(drift.get("median"), "{:.3f}"),
                      str(field.get("labels", 0)), _pct(field.get("accuracy")), _pct(m.get("converter_accuracy")),
                      Text("-" if delta is None else f"{delta:+.1f} pt",
                           style="red" if delta is not None and delta < -1 else ""))
        parts += [t, Text("")]

    drift, field = detail.get("drift") or {}, detail.get("field") or {}
    threshold = drift.get("threshold")
    head = Text(f"{detail.get('name')} v{detail.get('version')}", style="bold")
    drifting = drift.get("drifting") or []
    parts.append(head)
    parts.append(Text(f"drift: {drift.get('devices', 0)} device(s) reporting, median {num(drift.get('median'), '{:.3f}')}"
                      f", max {num(drift.get('max'), '{:.3f}')}; over {threshold}: "
                      + (", ".join(drifting) if drifting else "none"), style="red" if drifting else ""))
    converters = detail.get("converter") or []
    conv = "; ".join(f"{c.get('profile')}: {_pct(c.get('accuracy'))}" + (f" on {c.get('samples')} samples"
                                                                          if c.get("samples") else "")
                     for c in converters if c.get("measured")) or "not in the repository or measured without labels"
    parts.append(Text(f"field accuracy: {_pct(field.get('accuracy'))} from {field.get('labels', 0)} label(s) on "
                      f"{field.get('devices', 0)} device(s)" + (f" ({field['unmatched']} unmatched)"
                                                                 if field.get("unmatched") else "")))
    parts.append(Text(f"converter (eval data): {conv}"))
    per_class = field.get("per_class") or []
    if per_class and field.get("labels"):
        conv_classes = {c["class"]: c for c in (next((c for c in converters if c.get("measured")), {}) or {})
                        .get("per_class", [])}
        t = Table(box=None, header_style="bold", pad_edge=False, title="per class (field | converter)",
                  title_justify="left")
        for column in ("class", "support", "precision", "recall", "F1", "conv. precision", "conv. recall",
                       "conv. F1"):
            t.add_column(column, justify="right")
        for c in per_class:
            ref = conv_classes.get(c["class"], {})
            t.add_row(str(c["class"]), str(c["support"]), num(c["precision"], "{:.3f}"), num(c["recall"], "{:.3f}"),
                      num(c["f1"], "{:.3f}"), num(ref.get("precision"), "{:.3f}"), num(ref.get("recall"), "{:.3f}"),
                      num(ref.get("f1"), "{:.3f}"))
        parts += [Text(""), t]
    devices = detail.get("devices") or []
    if devices:
        t = Table(box=None, header_style="bold", pad_edge=False, title="devices", title_justify="left")
        for column in ("device", "profile", "runs it", "drift", "labels", "accuracy"):
            t.add_column(column, justify="left" if column in ("device", "profile") else "right")
        for d in devices:
            t.add_row(str(d["device_id"]), str(d.get("profile") or "-"), "yes" if d.get("current") else "no",
                      drift_text(d.get("drift"), threshold), str(d.get("labels") or 0), _pct(d.get("accuracy")))
        parts += [Text(""), t]
    return Group(*parts)


def device_renderable(doc: Mapping[str, Any], window_s: float) -> Any:
    """A device's facts, sparklines of the last hour, recent telemetry, events and alerts."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    d = doc.get("device") or {}
    rows = sorted(doc.get("telemetry") or [], key=lambda r: float(r.get("ts") or 0))
    now = time.time()
    state = Text("online", style="green") if d.get("online") else Text("offline", style="bold red")
    head = Text.assemble((str(d.get("device_id")), "bold"), "  ", state,
                         f"  last seen {ago(d.get('last_seen'), now)}  profile {d.get('profile') or '-'}",
                         f"  groups {','.join(d.get('groups') or []) or '-'}  agent {d.get('agent_version') or '-'}")
    runtime = d.get("runtime")
    if isinstance(runtime, Mapping):
        runtime = " ".join(str(v) for v in (runtime.get("name"), runtime.get("version")) if v)
    elif runtime and d.get("runtime_version"):
        runtime = f"{runtime} {d['runtime_version']}"
    model = d.get("model") or {}
    facts = Text(f"model {model_text(model)}" + (f" (sha256 {str(model.get('sha256'))[:12]}…)" if model.get("sha256")
                                                 else "") + f"  runtime {runtime or '-'}  delegate "
                 f"{d.get('delegate') or '-'}  pending {pending_text(d.get('pending_deployment'))}  "
                 f"lost {int(d.get('lost') or 0)}")
    latest = Text(f"latest: p95 {num(d.get('p95_ms'), '{:.2f}', ' ms')}  {num(d.get('inferences_per_s'))} inf/s  "
                  f"CPU {num(d.get('cpu_percent'), '{:.0f}', ' %')}  {num(d.get('temperature_c'), '{:.1f}', ' °C')}  "
                  f"memory {num(d.get('memory_percent'), '{:.0f}', ' %')}"
                  + (f"  drift {float(d['drift']['score']):.2f}" if (d.get("drift") or {}).get("score") is not None
                     else ""))
    parts: list[Any] = [head, facts, latest, Text("")]

    spark = Table(box=None, show_header=True, header_style="bold", pad_edge=False,
                  title=f"last {window_s / 60:g} min: {len(rows)} sample(s)", title_justify="left")
    for column in ("metric", "trend", "min", "max", "last"):
        spark.add_column(column, justify="left" if column in ("metric", "trend") else "right")
    for label, names, fmt in (("p95 ms", ("p95_ms",), "{:.2f}"), ("inf/s", ("inferences_per_s",), "{:.1f}"),
                              ("CPU %", ("cpu_percent", "cpu"), "{:.0f}"),
                              ("temp °C", ("temperature_c", "temperature"), "{:.1f}")):
        values = [pick(r, *names) for r in rows]
        present = [float(v) for v in values if v is not None]
        spark.add_row(label, sparkline(downsample([None if v is None else float(v) for v in values], 60)),
                      num(min(present), fmt) if present else "-", num(max(present), fmt) if present else "-",
                      num(present[-1], fmt) if present else "-")
    parts += [spark, Text("")]

    if rows:
        recent = Table(box=None, header_style="bold", pad_edge=False, title="recent telemetry", title_justify="left")
        for column in ("time", "model", "p50 ms", "p95 ms", "p99 ms", "inf/s", "errors", "CPU %", "temp °C"):
            recent.add_column(column, justify="left" if column in ("time", "model") else "right")
        for r in rows[-10:]:
            recent.add_row(time.strftime("%H:%M:%S", time.localtime(float(r["ts"]))),
                           str(pick(r, "model_version") or "-"), num(r.get("p50_ms"), "{:.2f}"),
                           num(r.get("p95_ms"), "{:.2f}"), num(r.get("p99_ms"), "{:.2f}"),
                           num(r.get("inferences_per_s")), num(r.get("errors"), "{:.0f}"),
                           num(pick(r, "cpu_percent", "cpu"), "{:.0f}"),
                           num(pick(r, "temperature_c", "temperature")))
        parts += [recent, Text("")]

    events = doc.get("events") or []
    ev = Table(box=None, header_style="bold", pad_edge=False, title=f"events ({len(events)} latest)",
               title_justify="left")
    for column in ("time", "kind", "reason", "command"):
        ev.add_column(column)
    for e in sorted(events, key=lambda e: float(e.get("ts") or 0), reverse=True)[:10]:
        ev.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e.get("ts") or 0))), str(e.get("kind")),
                   str(e.get("reason") or ""), str(e.get("command_id") or "-"))
    parts += [ev if events else Text("no events"), Text("")]

    alerts = doc.get("alerts") or []
    if alerts:
        al = Table(box=None, header_style="bold", pad_edge=False, title="alerts", title_justify="left")
        for column in ("kind", "state", "since", "message"):
            al.add_column(column)
        for a in alerts:
            active = bool(a.get("active"))
            al.add_row(str(a.get("kind")), Text("active", style="bold red") if active else Text("closed"),
                       ago(pick(a, "opened_at", "ts"), now), str(a.get("message") or ""))
        parts.append(al)
    else:
        parts.append(Text("no alerts"))
    return Group(*parts)


__all__ = ["ApiClient", "AuthError", "FleetApiError", "ago", "device_renderable", "drift_text", "quality_renderable",
           "register", "sparkline", "status_renderable", "summary_text"]
