"""The ports handed to servers the tests, benches and `relay dev` start: none the kernel could
give an outgoing connection before the server binds it (CI saw a `relay worker` fail with
"address already in use" on such a port), none twice, and none another process has just
been handed (a suite ran beside another saw a test server's port taken)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from relay.devtools.ports import free_port, free_ports


def ephemeral_range() -> range:
    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_no_port_is_one_an_outgoing_connection_could_be_given() -> None:
    ephemeral = ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert [p for p in ports if p in ephemeral] == []


def test_a_port_is_handed_out_once_even_when_it_was_never_bound() -> None:
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_a_port_in_use_or_to_be_avoided_is_skipped() -> None:
    # Ports are handed out in turn, so the two after this one are the next candidates.
    last = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", last + 1))
        held.listen()
        port = free_port(avoid={last + 2})
    assert port not in (last + 1, last + 2)


def test_a_run_of_ports_is_free_and_none_of_it_is_handed_out_again() -> None:
    first = free_ports(3)
    run = {first, first + 1, first + 2}
    for port in run:
        with socket.socket() as sock:
            sock.bind(("", port))  # each is free
    later = {free_port() for _ in range(300)}
    assert not run & later


def test_a_port_another_process_was_just_handed_is_not_handed_out() -> None:
    port = free_port()  # not bound: a server of this process is about to bind it
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from relay.devtools import ports\n"
            f"ports.use_range(range({port}, {port + 2}))\n"
            "print(ports.free_port())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(other.stdout) == port + 1
