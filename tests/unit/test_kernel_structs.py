"""kernel/_repair_cdef declares struct tcp_info as the kernel lays it out (the offsets uapi has
kept stable since 4.x), and kernel.repair.tcp_info reads a real socket's."""

from __future__ import annotations

import socket

from kernel._repair_cdef import ffi
from kernel.repair import tcp_info

INFO = "struct tcp_info_prefix"


def test_tcp_info_fields_sit_where_the_uapi_header_puts_them() -> None:
    assert ffi.offsetof(INFO, "tcpi_rto") == 8
    assert ffi.offsetof(INFO, "tcpi_total_retrans") == 100
    assert ffi.offsetof(INFO, "tcpi_bytes_acked") == 120
    assert ffi.offsetof(INFO, "tcpi_segs_in") == 140


def test_tcp_info_of_a_connected_socket_counts_its_handshake() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()) as client:
        conn, _ = srv.accept()
        with conn:
            client.sendall(b"x" * 10)
            assert conn.recv(10)
            info = tcp_info(client)
            assert info.tcpi_state == 1  # TCP_ESTABLISHED
            assert info.tcpi_bytes_acked >= 1  # the SYN at least
            assert tcp_info(conn).tcpi_bytes_received == 10
