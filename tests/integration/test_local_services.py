"""`erasure services` starts SeaweedFS with every port on loopback, and only the ports it chose."""

import json
import socket
import time

import pytest

from tests.integration.conftest import free_port


def _listening(pid: int) -> set[tuple[str, int]]:
    psutil = pytest.importorskip("psutil")
    process = psutil.Process(pid)
    found = set()
    for member in (process, *process.children(recursive=True)):
        for connection in member.net_connections(kind="inet"):
            udp_bound = connection.type == socket.SOCK_DGRAM and not connection.raddr
            if connection.status == psutil.CONN_LISTEN or udp_bound:
                found.add((connection.laddr.ip, connection.laddr.port))
    return found


def test_seaweedfs_listens_on_loopback_only_and_on_the_ports_we_chose(tmp_path, monkeypatch):
    from cli import services as svc

    monkeypatch.setenv("ERASURE_STATE_DIR", str(tmp_path))
    svc.start_s3(svc.Ports(s3=free_port()))
    try:
        record = json.loads((svc.services_dir() / "s3.pid").read_text())
        chosen = set(record["ports"].values())
        deadline = time.time() + 15  # the admin server starts after S3 answers
        while {port for _, port in _listening(record["pid"])} != chosen and time.time() < deadline:
            time.sleep(0.2)
        listening = _listening(record["pid"])
        assert {address for address, _ in listening} == {"127.0.0.1"}, listening
        assert {port for _, port in listening} == chosen  # no WebDAV, Iceberg, Lance or default ports
    finally:
        svc.stop("s3")
