"""Broker configuration rendering and the private CA, without a broker (see test_broker_acl.py for that)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.protocol.errors import SchemaError
from agent.protocol.topics import Topics, parse
from fleet import broker, pki
from fleet.broker import BrokerConfigError, BrokerSettings, DeviceSpec, parse_device_spec
from litefleet.cli import main as litefleet_main

FLEET = "plant-7"


def acl_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


# --- device specs and the devices file -----------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("cam-01", DeviceSpec("cam-01")),
    ("cam-01:line1", DeviceSpec("cam-01", ("line1",))),
    ("cam-01:line1,east@rpi4-cpu", DeviceSpec("cam-01", ("line1", "east"), "rpi4-cpu")),
    ("cam-01@coral", DeviceSpec("cam-01", (), "coral")),
])
def test_device_spec_parses_id_groups_and_profile(spec, expected):
    assert parse_device_spec(spec) == expected


@pytest.mark.parametrize("spec, word", [("cam/01", "device id"), ("cam-01:li+ne", "group"),
                                        ("cam-01@co#ral", "profile"), ("", "device id")])
def test_device_spec_with_topic_characters_is_refused_naming_the_part(spec, word):
    with pytest.raises(ValueError, match=word):
        parse_device_spec(spec)


def test_devices_file_is_read_and_errors_name_file_and_key(tmp_path):
    good = tmp_path / "devices.toml"
    good.write_text('[[device]]\nid = "a"\ngroups = ["g1", "g2"]\nprofile = "rpi4"\n\n[[device]]\nid = "b"\n')
    assert broker.load_devices_file(good) == [DeviceSpec("a", ("g1", "g2"), "rpi4"), DeviceSpec("b")]

    typo = tmp_path / "typo.toml"
    typo.write_text('[[device]]\nid = "a"\ngroup = ["g1"]\n')
    with pytest.raises(SchemaError) as err:
        broker.load_devices_file(typo)
    assert str(typo) in str(err.value) and "device[0].group" in str(err.value) and "groups" in str(err.value)

    bad_id = tmp_path / "bad.toml"
    bad_id.write_text('[[device]]\nid = "a/b"\n')
    with pytest.raises(SchemaError, match=r"bad.toml: device\[0\].id: .*no '/'"):
        broker.load_devices_file(bad_id)


def test_same_device_twice_with_different_groups_is_an_error():
    with pytest.raises(BrokerConfigError, match="'a' is given twice"):
        broker.merge_devices([DeviceSpec("a", ("g1",)), DeviceSpec("a", ("g2",))])
    assert broker.merge_devices([DeviceSpec("a"), DeviceSpec("a")]) == [DeviceSpec("a")]


def test_devices_toml_round_trips():
    devices = [DeviceSpec("a", ("g1", "g2"), "rpi4"), DeviceSpec("b")]
    assert broker.parse_devices_toml(broker.render_devices_toml(devices), "x") == devices


# --- ACL ------------------------------------------------------------------------------------------

def test_acl_gives_devices_only_their_own_reports_and_their_commands():
    settings = BrokerSettings(FLEET)
    t = Topics(FLEET)
    lines = acl_lines(broker.render_acl(settings, [DeviceSpec("cam-01", ("line1",), "rpi4")]))
    # every write a device gets is a pattern on its own certificate name
    device_writes = [line for line in lines if line.startswith("pattern write")]
    assert device_writes == [f"pattern write {str(t.device('X', ch)).replace('/X/', '/%u/')}"
                             for ch in ("status", "telemetry", "events", "chunkreq")]
    assert f"pattern read {str(t.commands('device', 'X')).replace('/X/', '/%u/')}" in lines
    block = lines[lines.index("user cam-01") + 1: lines.index("user operator")]
    assert block == [f"topic read {t.commands('all')}", f"topic read {t.commands('group', 'line1')}",
                     f"topic read {t.commands('profile', 'rpi4')}", f"topic read {t.all_blobs()}"]
    # no device-wide write anywhere but the patterns on %u; no readwrite, no '#'
    assert not any("readwrite" in line or line.endswith("#") for line in lines)


def test_acl_topics_are_litefleet_topics():
    """Every concrete filter in the ACL parses as a topic of this protocol version."""
    text = broker.render_acl(BrokerSettings(FLEET), [DeviceSpec("cam-01", ("line1",), "rpi4")])
    for line in acl_lines(text):
        if line.startswith(("topic ", "pattern ")):
            topic = line.split()[-1].replace("%u", "someone").replace("/+/", "/x/")
            topic = topic.replace("blob/x/", f"blob/{'0' * 64}/")
            assert parse(topic) is not None, line


def test_operator_may_publish_commands_and_server_may_publish_chunks_and_commands():
    settings = BrokerSettings(FLEET, operator="ops", server="repo")
    t = Topics(FLEET)
    lines = acl_lines(broker.render_acl(settings, []))
    operator = lines[lines.index("user ops") + 1: lines.index("user repo")]
    server = lines[lines.index("user repo") + 1:]
    commands = [f"topic write {c}" for c in broker.command_filters(FLEET)]
    assert str(t.commands("all")) in broker.command_filters(FLEET)
    assert all(c in operator for c in commands) and all(c in server for c in commands)
    assert f"topic write {t.all_blobs()}" in server and f"topic write {t.all_blobs()}" not in operator
    for channel in ("status", "telemetry", "events", "chunkreq"):
        assert f"topic read {t.all_devices(channel)}" in server
    assert f"topic read {t.all_devices('status')}" in operator


def test_device_named_like_the_operator_is_refused():
    with pytest.raises(BrokerConfigError, match="operator identity"):
        broker.render_acl(BrokerSettings(FLEET), [DeviceSpec("operator")])


# --- mosquitto.conf -------------------------------------------------------------------------------

def test_conf_has_tls_identity_limits_and_queues(tmp_path):
    settings = BrokerSettings(FLEET, port=18884, chunk_size=128 * 1024, max_queued_bytes=1 << 30,
                              max_inflight_messages=50)
    layout = broker.Layout(tmp_path / "cfg")
    lines = broker.render_mosquitto_conf(settings, layout).splitlines()
    for expected in ("per_listener_settings false", "allow_anonymous false", f"acl_file {layout.acl}",
                     "listener 18884", f"cafile {layout.ca_cert}", f"certfile {layout.server_cert}",
                     f"keyfile {layout.server_key}", "require_certificate true", "use_identity_as_username true",
                     "tls_version tlsv1.2", "set_tcp_nodelay true", f"max_packet_size {128 * 1024 + 65536}",
                     "max_queued_messages 0", f"max_queued_bytes {1 << 30}", "max_inflight_messages 50",
                     "persistence true", f"persistence_location {layout.data}", f"log_dest file {layout.log}"):
        assert expected in lines
    # paths are absolute, whatever the caller passed
    assert all(Path(line.split(None, 1)[1]).is_absolute() for line in lines
               if line.startswith(("cafile", "certfile", "keyfile", "acl_file", "persistence_location")))
    assert not any(line.startswith("user ") for line in lines)  # only with run_as
    assert "user mosquitto" in broker.render_mosquitto_conf(BrokerSettings(FLEET, run_as="mosquitto"), layout)


def test_relative_output_dir_still_renders_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = broker.Layout(Path("rel"))
    assert layout.acl == tmp_path / "rel" / "acl"


@pytest.mark.parametrize("kwargs, word", [({"port": 0}, "port"), ({"chunk_size": 10}, "chunk size"),
                                          ({"operator": "x", "server": "x"}, "must differ"),
                                          ({"fleet": "a/b"}, "fleet"), ({"tls_version": "tlsv1.1"}, "tls")])
def test_bad_settings_are_refused(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BrokerSettings(**{"fleet": FLEET, **kwargs})


# --- certificates ---------------------------------------------------------------------------------

def test_ca_and_leaf_certificates_have_the_right_extensions():
    ca = pki.make_ca("test CA")
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    server = pki.issue(ca, "server", server=True, hosts=["broker.example", "10.0.0.5", "localhost", "127.0.0.1"])
    assert pki.san_names(server.cert) == {"broker.example", "10.0.0.5", "localhost", "127.0.0.1"}
    assert server.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert not server.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    client = pki.issue(ca, "cam-01")
    assert pki.common_name(client.cert) == "cam-01"
    assert client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert pki.issued_by(client.cert, ca.cert) and not pki.issued_by(client.cert, pki.make_ca("other").cert)
    assert client.cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_openssl_verifies_the_chain_and_purposes(tmp_path):
    """OpenSSL itself (what mosquitto uses) accepts the certificates for their purpose only."""
    result = broker.generate(tmp_path / "cfg", BrokerSettings(FLEET, hosts=("broker.example",)),
                             [DeviceSpec("cam-01")])
    layout = result.layout

    def verify(purpose: str, cert: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", "verify", "-CAfile", str(layout.ca_cert), "-purpose", purpose, str(cert)],
                              capture_output=True, text=True)

    assert verify("sslserver", layout.server_cert).returncode == 0
    assert verify("sslclient", layout.client_cert("cam-01")).returncode == 0
    assert verify("sslserver", layout.client_cert("cam-01")).returncode != 0  # a device cannot pose as the broker
    host = subprocess.run(["openssl", "x509", "-in", str(layout.server_cert), "-noout", "-checkhost", "broker.example"],
                          capture_output=True, text=True)
    assert "does match" in host.stdout


# --- generate: files, permissions, adding devices ----------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_everything_with_private_keys_0600(tmp_path):
    result = broker.generate(tmp_path / "cfg", BrokerSettings(FLEET), [DeviceSpec("cam-01", ("g",), "rpi4")])
    layout = result.layout
    assert result.issued == ["server", "operator", "litefleet-server", "cam-01"] and not result.ca_reused
    for key in (layout.ca_key, layout.server_key, layout.client_key("cam-01"), layout.client_key("operator"),
                layout.client_key("litefleet-server")):
        assert mode(key) == 0o600, key
    for cert in (layout.ca_cert, layout.server_cert, layout.client_cert("cam-01")):
        assert mode(cert) == 0o644
    for name in ("cam-01", "operator", "litefleet-server"):
        issued = pki.load_issued(layout.client_cert(name), layout.client_key(name))
        assert pki.common_name(issued.cert) == name
    assert layout.conf.exists() and layout.acl.exists() and layout.data.is_dir()
    assert not list(layout.root.rglob(".*.tmp-*"))  # atomic writes leave no temporaries


def test_rerun_adds_a_device_reusing_the_ca_and_keeping_earlier_devices(tmp_path):
    out = tmp_path / "cfg"
    first = broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-01", ("g1",))])
    ca_before = first.layout.ca_cert.read_bytes()
    cam1_before = first.layout.client_cert("cam-01").read_bytes()

    second = broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-02", (), "rpi4")])
    assert second.ca_reused and second.issued == ["cam-02"]
    assert second.layout.ca_cert.read_bytes() == ca_before
    assert second.layout.client_cert("cam-01").read_bytes() == cam1_before
    acl = second.layout.acl.read_text()
    assert "user cam-01" in acl and str(Topics(FLEET).commands("group", "g1")) in acl  # still there
    assert "user cam-02" in acl and str(Topics(FLEET).commands("profile", "rpi4")) in acl
    cam2 = pki.load_cert(second.layout.client_cert("cam-02"))
    assert pki.issued_by(cam2, pki.load_cert(second.layout.ca_cert))

    # a new host name re-issues the server certificate under the same CA
    third = broker.generate(out, BrokerSettings(FLEET, hosts=("mqtt.plant7.example",)), [])
    assert third.issued == ["server"] and third.layout.ca_cert.read_bytes() == ca_before
    assert "mqtt.plant7.example" in pki.san_names(pki.load_cert(third.layout.server_cert))


def test_config_without_devices_can_get_devices_later(tmp_path):
    out = tmp_path / "cfg"
    assert broker.generate(out, BrokerSettings(FLEET), []).issued == ["server", "operator", "litefleet-server"]
    later = broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-01")])
    assert later.ca_reused and later.issued == ["cam-01"] and "user cam-01" in later.layout.acl.read_text()


def test_force_makes_a_new_ca_and_reissues_everything(tmp_path):
    out = tmp_path / "cfg"
    first = broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-01")])
    ca_before = first.layout.ca_cert.read_bytes()
    broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-02")])
    again = broker.generate(out, BrokerSettings(FLEET), [], force=True)
    assert not again.ca_reused and again.layout.ca_cert.read_bytes() != ca_before
    assert set(again.issued) == {"server", "operator", "litefleet-server", "cam-01", "cam-02"}
    ca = pki.load_cert(again.layout.ca_cert)
    assert pki.issued_by(pki.load_cert(again.layout.client_cert("cam-01")), ca)


def test_half_a_ca_foreign_certificates_and_another_fleet_are_refused(tmp_path):
    out = tmp_path / "cfg"
    layout = broker.generate(out, BrokerSettings(FLEET), [DeviceSpec("cam-01")]).layout

    with pytest.raises(BrokerConfigError, match="made for 'litefleet plant-7', not fleet 'other'"):
        broker.generate(out, BrokerSettings("other"), [DeviceSpec("cam-01")])

    foreign = pki.issue(pki.make_ca("someone else's CA"), "cam-01")
    layout.client_cert("cam-01").write_bytes(foreign.cert_pem())
    layout.client_key("cam-01").write_bytes(foreign.key_pem())
    with pytest.raises(BrokerConfigError, match="cam-01.crt was not issued by"):
        broker.generate(out, BrokerSettings(FLEET), [])

    layout.ca_key.unlink()
    with pytest.raises(BrokerConfigError, match="ca.key is missing"):
        broker.generate(out, BrokerSettings(FLEET), [])


def test_mismatched_key_and_certificate_are_reported(tmp_path):
    layout = broker.generate(tmp_path / "cfg", BrokerSettings(FLEET), [DeviceSpec("a"), DeviceSpec("b")]).layout
    layout.client_key("a").write_bytes(layout.client_key("b").read_bytes())
    with pytest.raises(pki.PkiError, match="a.key is not the private key of .*a.crt"):
        broker.generate(tmp_path / "cfg", BrokerSettings(FLEET), [])


# --- the command line -------------------------------------------------------------------------------

def test_cli_writes_a_config_and_adds_devices(tmp_path, capsys):
    out = tmp_path / "broker"
    devices = tmp_path / "devices.toml"
    devices.write_text('[[device]]\nid = "cam-03"\ngroups = ["east"]\n')
    assert litefleet_main(["broker", "config", "-o", str(out), "--fleet", FLEET, "--device", "cam-01:east@rpi4",
                           "--devices-file", str(devices), "--host", "broker.example", "--port", "18883",
                           "--chunk-size", "128K"]) == 0
    assert f"mosquitto -c {out / 'mosquitto.conf'}" in capsys.readouterr().out
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 18883" in conf and f"max_packet_size {128 * 1024 + 65536}" in conf
    assert (out / "clients" / "cam-03.crt").exists() and mode(out / "ca.key") == 0o600

    assert litefleet_main(["broker", "config", "-o", str(out), "--fleet", FLEET, "--device", "cam-04",
                           "--json"]) == 0
    assert '"issued": [\n    "cam-04"\n  ]' in capsys.readouterr().out


def test_cli_reports_a_bad_devices_file_and_exits_non_zero(tmp_path, capsys):
    devices = tmp_path / "devices.toml"
    devices.write_text('[[device]]\nid = "cam-03"\nprofil = "rpi4"\n')
    assert litefleet_main(["broker", "config", "-o", str(tmp_path / "b"), "--fleet", FLEET,
                           "--devices-file", str(devices)]) == 2
    err = capsys.readouterr().err
    assert str(devices) in err and "device[0].profil" in err and "profile" in err
    assert not (tmp_path / "b").exists()  # nothing written
