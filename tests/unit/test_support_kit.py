"""The test kit's generic parts (tests/support: waiting, loopback, pki, processes) do what every
tier relies on: a wait returns the value it waited for and fails naming what it waited for, a
free port is free, a certificate verifies where it should and only there, and a child process
is stopped, killed, or taken down with the thread that started it. And the generic parts (with
the Kubernetes simulation in tests/k8s) import nothing of the product."""

from __future__ import annotations

import ast
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import loopback, pki, waiting
from tests.support.processes import ChildProcess
from tests.support.waiting import TimedOut, wait_until

# -- waiting ----------------------------------------------------------------------------------


class FakeClock:
    """Stands in for time.monotonic and time.sleep: the waits below take no real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(waiting.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(waiting.time, "sleep", fake.sleep)
    return fake


def test_wait_until_returns_the_first_truthy_value(clock: FakeClock) -> None:
    answers = iter([None, [], {"ready": True}])
    assert wait_until(lambda: next(answers), 10, "a body") == {"ready": True}
    assert clock.sleeps == [0.05, 0.1]  # backs off from 50 ms up to the interval


def test_wait_until_polls_no_more_often_than_the_interval_allows(clock: FakeClock) -> None:
    with pytest.raises(TimedOut):
        wait_until(lambda: False, 3, "never", interval=0.5)
    assert clock.sleeps[:4] == [0.05, 0.1, 0.2, 0.4] and set(clock.sleeps[4:]) == {0.5}


def test_wait_until_fails_naming_what_the_last_value_and_the_detail(clock: FakeClock) -> None:
    with pytest.raises(AssertionError) as failed:
        wait_until(lambda: [], 2, "three nodes Online", lambda: "log tail here")
    message = str(failed.value)
    assert message.startswith("timed out after 2 s waiting for three nodes Online (last: [])")
    assert message.endswith("\nlog tail here")
    assert clock.now > 2


def test_a_false_last_value_is_not_reported(clock: FakeClock) -> None:
    with pytest.raises(TimedOut, match=r"waiting for x$"):
        wait_until(lambda: False, 1, "x")


def test_an_exception_in_the_check_ends_the_wait_at_once(clock: FakeClock) -> None:
    def died() -> bool:
        raise AssertionError("node-1 exited with 1")

    with pytest.raises(AssertionError, match="node-1 exited"):
        wait_until(died, 60, "node-1 ready")
    assert clock.sleeps == []


# -- loopback ---------------------------------------------------------------------------------


def test_a_free_port_can_be_bound_and_a_listening_one_cannot() -> None:
    port = loopback.free_port()
    assert loopback.bindable("127.0.0.1", port)
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        assert not loopback.bindable("127.0.0.1", port)


def test_every_address_is_new_and_on_loopback() -> None:
    addresses = [loopback.next_address() for _ in range(600)]
    assert len(set(addresses)) == 600
    assert all(
        a.startswith("127.") and all(0 <= int(o) <= 255 for o in a.split(".")) for a in addresses
    )
    port = loopback.free_port(addresses[-1])  # bindable without any set-up: all of 127/8 is ours
    assert loopback.bindable(addresses[-1], port)


# -- pki --------------------------------------------------------------------------------------


def handshake(
    tmp: Path,
    server: pki.Issued,
    trusted: bytes,
    server_name: str,
    client: pki.Issued | None = None,
) -> x509.Certificate | None:
    """A real TLS handshake over loopback: the server presents ``server`` (and asks for a client
    certificate when ``client`` is given, trusting ``trusted`` for it); the client trusts only
    ``trusted`` and checks ``server_name``. Returns the client certificate the server saw."""
    cert, key = server.write(tmp / "server.crt", tmp / "server.key")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cadata=trusted.decode())
    if client is not None:
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        server_ctx.load_verify_locations(cadata=trusted.decode())
        client_ctx.load_cert_chain(*client.write(tmp / "client.crt", tmp / "client.key"))
    seen: list[x509.Certificate | None] = []
    errors: list[BaseException] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    seen.append(x509.load_der_x509_certificate(der) if der else None)
                    tls.recv(1)
            except (OSError, ssl.SSLError) as e:
                errors.append(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(10)
    return seen[0] if seen else None


def test_a_server_certificate_verifies_by_its_names_and_addresses_only(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority("kit-test-ca")
    issued = ca.issue("node-1", dns=["node-1.example.test"], ips=["127.0.0.5"])
    handshake(tmp_path, issued, ca.cert_pem, "node-1.example.test")
    handshake(tmp_path, issued, ca.cert_pem, "127.0.0.5")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(tmp_path, issued, ca.cert_pem, "node-2.example.test")
    with pytest.raises(ssl.SSLCertVerificationError):  # another CA's certificate
        handshake(
            tmp_path, issued, pki.CertificateAuthority("other").cert_pem, "node-1.example.test"
        )
    usage = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_a_client_certificate_carries_its_group(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority("kit-test-ca")
    server = ca.issue("api", dns=["api.example.test"])
    admin = ca.issue("admin", usage="client", organization="system:masters")
    seen = handshake(tmp_path, server, ca.cert_pem, "api.example.test", client=admin)
    assert seen is not None
    assert seen.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "system:masters"
    )


def test_a_self_signed_certificate_is_its_own_trust_anchor(tmp_path: Path) -> None:
    issued = pki.self_signed("mgr-0.mgr-nodes.ns.svc", dns=["mgr-0.mgr-nodes.ns.svc"])
    handshake(tmp_path, issued, issued.cert_pem, "mgr-0.mgr-nodes.ns.svc")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tmp_path, issued, issued.cert_pem, "mgr-1.mgr-nodes.ns.svc")


def test_written_keys_are_private(tmp_path: Path) -> None:
    cert, key = (
        pki.CertificateAuthority("ca").issue("x").write(tmp_path / "x.crt", tmp_path / "x.key")
    )
    assert key.stat().st_mode & 0o777 == 0o600
    assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


# -- processes --------------------------------------------------------------------------------


def test_a_child_logs_to_its_file_and_stops_on_sigterm(tmp_path: Path) -> None:
    child = ChildProcess(
        ["sh", "-c", "echo started; exec sleep 60"], tmp_path / "child.log", header=True
    ).start()
    wait_until(lambda: "started" in child.log_text(), 30, "the child's first line")
    assert child.log_text().splitlines()[0] == "$ sh -c echo started; exec sleep 60"
    assert child.running
    assert child.stop(grace=30) == -15
    assert not child.running and child.returncode == -15


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    script = "trap '' TERM; echo trapped; while :; do sleep 1; done"
    child = ChildProcess(["sh", "-c", script], tmp_path / "stubborn.log").start()
    wait_until(lambda: "trapped" in child.log_text(), 30, "the trap set")
    with pytest.raises(subprocess.TimeoutExpired):
        child.terminate(timeout=0.5)
    assert child.stop(grace=0.5) == -9


def test_a_bound_child_dies_with_the_thread_that_started_it(tmp_path: Path) -> None:
    started: list[ChildProcess] = []
    thread = threading.Thread(
        target=lambda: started.append(
            ChildProcess(["sleep", "60"], tmp_path / "bound.log", bound_to_parent=True).start()
        )
    )
    thread.start()
    thread.join()
    child = started[0]
    assert child.proc is not None
    assert child.proc.wait(30) == -9  # SIGKILL from the kernel, not from us


# -- layering ---------------------------------------------------------------------------------

GENERIC_SUPPORT = {"waiting", "loopback", "pki", "processes", "buildcache"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def product_imports(path: Path) -> list[str]:
    """What ``path`` imports of the product or of the product's test support."""

    def of_the_product(module: str) -> bool:
        parts = module.split(".")
        if parts[0] in ("dsm_node", "dsm_operator"):
            return True
        return (
            parts[:2] == ["tests", "support"] and len(parts) > 2 and parts[2] not in GENERIC_SUPPORT
        )

    return [m for m in sorted(imported_modules(path)) if of_the_product(m)]


def test_the_kubernetes_simulation_and_the_generic_kit_know_nothing_of_the_product() -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    generic = sorted((tests_dir / "k8s").glob("*.py"))
    generic += [tests_dir / "support" / f"{name}.py" for name in sorted(GENERIC_SUPPORT)]
    assert len(generic) > 10
    found = {str(p.relative_to(tests_dir)): product_imports(p) for p in generic}
    assert {p: bad for p, bad in found.items() if bad} == {}


def test_the_layering_check_sees_a_product_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from tests.support import nodes, waiting\n"
        "import dsm_node.cli\n"
        "from tests.support.pki import Issued\n"
    )
    assert product_imports(probe) == ["dsm_node.cli", "tests.support.nodes"]
