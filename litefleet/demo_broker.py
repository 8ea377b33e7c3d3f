"""The demo's MQTT broker: the one given, mosquitto as a child process, or amqtt in-process.

Why three: on a machine with mosquitto the demo runs the project's real broker configuration
(TLS, a certificate per device, the ACL from :mod:`fleet.broker`); on a bare machine amqtt (a
pure-Python broker installed with ``litefleet[host]``) needs nothing else, at the price of MQTT
3.1.1 only and no TLS or ACL; ``--broker URL`` uses a broker someone already runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol.errors import LitefleetError

HOST = "127.0.0.1"
KINDS = ("auto", "mosquitto", "amqtt")


class DemoBrokerError(LitefleetError):
    """The demo's broker could not be started; the message says why and what to do."""


@dataclass
class Endpoint:
    """How a client reaches the broker: URL and, for mqtts://, its TLS files per identity."""

    url: str
    kind: str                              # "external", "mosquitto" or "amqtt"
    note: str = ""
    ca: Path | None = None
    clients: Path | None = None            # DIR/clients/{name}.crt|.key
    pid: int | None = None
    stop: object = field(default=None, repr=False)

    def tls_for(self, name: str) -> tuple[str, str, str] | None:
        """(ca, cert, key) for identity ``name``, or None on a plain mqtt:// broker."""
        if self.ca is None or self.clients is None:
            return None
        return str(self.ca), str(self.clients / f"{name}.crt"), str(self.clients / f"{name}.key")


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def choose_kind(kind: str) -> str:
    """``auto``: mosquitto when installed, else amqtt."""
    if kind == "auto":
        return "mosquitto" if find_mosquitto() else "amqtt"
    return kind


# mosquitto --------------------------------------------------------------------------------

class MosquittoBroker:
    """``mosquitto -c`` on the project's generated configuration (TLS + ACL), on a free port."""

    def __init__(self, directory: Path, fleet: str, devices: list[tuple[str, tuple[str, ...], str]]) -> None:
        self.directory = directory
        self.fleet = fleet
        self.devices = devices
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 10.0, attempts: int = 5) -> Endpoint:
        from fleet import broker as broker_mod
        exe = find_mosquitto()
        if exe is None:
            raise DemoBrokerError("mosquitto is not installed (not on PATH nor in /usr/sbin); use "
                                  "--broker-kind amqtt, or install mosquitto")
        specs = [broker_mod.DeviceSpec(d, groups, profile) for d, groups, profile in self.devices]
        run_as = "root" if os.geteuid() == 0 else ""   # as root mosquitto would drop to a user who cannot read our keys
        last = ""
        for _ in range(attempts):
            port = free_port()
            settings = broker_mod.BrokerSettings(self.fleet, port=port, bind_address=HOST, run_as=run_as)
            result = broker_mod.generate(self.directory, settings, specs)
            layout = result.layout
            out = open(self.directory / "stdout.txt", "ab")
            self.proc = subprocess.Popen([exe, "-c", str(layout.conf)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            out.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port_open(HOST, port):
                    break
                time.sleep(0.05)   # polling interval of a deadline loop
            if self.proc.poll() is None and port_open(HOST, port):
                self.port = port
                return Endpoint(f"mqtts://localhost:{port}", "mosquitto",
                                "mosquitto with the generated configuration: mutual TLS, one certificate per "
                                "device, ACL on the certificate identity", layout.ca_cert, layout.clients,
                                self.proc.pid, self.stop)
            self._kill()
            last = (self.directory / "stdout.txt").read_text(errors="replace")[-1500:]
        raise DemoBrokerError(f"mosquitto did not start (config {self.directory / 'mosquitto.conf'}):\n{last}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self._kill()


# amqtt --------------------------------------------------------------------------------------

class AmqttBroker:
    """amqtt's broker (plain MQTT 3.1.1, pure Python) in a child Python process.

    A child rather than a thread of the demo: it keeps running with ``--keep``, and the demo's
    own threads (load, table) do not share its interpreter lock.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 20.0, attempts: int = 5) -> Endpoint:
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise DemoBrokerError("amqtt is not installed: pip install 'litefleet[host]' (or amqtt), "
                                  "or give --broker URL") from None
        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / "amqtt.log"
        for _ in range(attempts):
            port = free_port()
            log = open(log_path, "ab")
            self.proc = subprocess.Popen([sys.executable, "-m", "litefleet.demo_broker", "amqtt", str(port),
                                          str(self.directory)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None and not port_open(HOST, port):
                time.sleep(0.05)   # polling interval of a deadline loop
            if self.proc.poll() is None and port_open(HOST, port):
                self.port = port
                return Endpoint(f"mqtt://{HOST}:{port}", "amqtt",
                                "amqtt (pure Python, no install needed): MQTT 3.1.1 only, plain TCP, no TLS, "
                                "no ACL; install mosquitto for the real configuration",
                                pid=self.proc.pid, stop=self.stop)
            self.stop()
        raise DemoBrokerError(f"amqtt did not start; see {log_path}:\n"
                              f"{log_path.read_text(errors='replace')[-1500:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _refuse_other_protocols_fast() -> None:
    """Make amqtt answer an MQTT 5 CONNECT at once with "unacceptable protocol version".

    amqtt parses a v5 CONNECT as 3.1.1, misreads its properties as the client id's length and
    waits for bytes that never come; clients that try MQTT 5 first (ours) would fall back to
    3.1.1 only after their keepalive timeout. Stopping at the protocol level lets amqtt's own
    check send the refusal (CONNACK code 1), and the client falls back within milliseconds.
    """
    try:
        from amqtt.mqtt.connect import ConnectPayload
        original = ConnectPayload.from_stream.__func__
    except (ImportError, AttributeError):   # another amqtt: clients still fall back, after their keepalive
        return

    async def from_stream(cls, reader, fixed_header, variable_header):  # noqa: ANN001
        if variable_header is not None and variable_header.proto_level != 4:
            payload = cls()
            payload.client_id = "unsupported-protocol"
            if variable_header.will_flag:
                payload.will_topic, payload.will_message = "unsupported", b""
            return payload
        return await original(cls, reader, fixed_header, variable_header)

    ConnectPayload.from_stream = classmethod(from_stream)


def run_amqtt(port: int) -> int:
    """The child: serve on 127.0.0.1:``port`` until SIGTERM/SIGINT."""
    from amqtt.broker import Broker
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)   # a client vanishing mid-packet is not news
    _refuse_other_protocols_fast()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        broker = Broker(config)
        await broker.start()
        print(f"amqtt listening on {HOST}:{port}", flush=True)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())
    return 0


def start_broker(kind: str, url: str | None, directory: Path, fleet: str,
                 devices: list[tuple[str, tuple[str, ...], str]]) -> Endpoint:
    """The broker the demo uses; ``endpoint.stop()`` stops what was started here (nothing for --broker)."""
    if url:
        if not url.startswith("mqtt://"):
            raise DemoBrokerError(f"--broker {url}: the demo takes a plain mqtt:// URL (for TLS, run the "
                                  f"commands of docs by hand)")
        return Endpoint(url, "external", "the broker given with --broker (plain MQTT)", stop=lambda: None)
    kind = choose_kind(kind)
    if kind == "mosquitto":
        directory.mkdir(parents=True, exist_ok=True)
        return MosquittoBroker(directory, fleet, devices).start()
    return AmqttBroker(directory).start()


__all__ = ["Endpoint", "DemoBrokerError", "start_broker", "choose_kind", "find_mosquitto", "KINDS", "free_port"]


if __name__ == "__main__":
    # DIR (unused) names the demo's folder on the command line, so its processes can be found
    if len(sys.argv) in (3, 4) and sys.argv[1] == "amqtt":
        sys.exit(run_amqtt(int(sys.argv[2])))
    sys.exit("usage: python -m litefleet.demo_broker amqtt PORT [DIR]")
