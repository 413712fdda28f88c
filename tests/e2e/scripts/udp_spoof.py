#!/usr/bin/env python3
"""UDP packets with someone else's source address, as any process with CAP_NET_RAW can send.

    udp_spoof.py forge SRC_IP:PORT DST_IP:PORT HEX
        sends the payload HEX from SRC to DST.
    udp_spoof.py replay IFACE SRC_IP DST_IP:PORT
        waits (at most 30 s) for a UDP packet from SRC_IP to DST on IFACE, then sends it again,
        unchanged, and prints its payload's length.
"""
import socket
import struct
import sys
import time


def send_ip(packet: bytes, dst: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        s.sendto(packet, (dst, 0))


def forge(src: str, dst: str, payload: bytes) -> bytes:
    (sip, sport), (dip, dport) = (parse(src), parse(dst))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    # Total length and checksum are filled in by the kernel for IPPROTO_RAW sockets.
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(sip), socket.inet_aton(dip),
    )
    return ip + udp


def parse(addr: str):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def replay(iface: str, src: str, dst: str) -> None:
    dip, dport = parse(dst)
    # ETH_P_ALL: a socket bound to one protocol sees only what the interface receives, and on a
    # bridge port the packets towards the node are sent.
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003)) as s:
        s.bind((iface, 0x0003))
        s.settimeout(1.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                packet, (_, proto, *_) = s.recvfrom(65535)
            except socket.timeout:
                continue
            if proto != 0x0800 or len(packet) < 28:
                continue
            ihl = (packet[0] & 0x0F) * 4
            if packet[9] != socket.IPPROTO_UDP:
                continue
            if socket.inet_ntoa(packet[12:16]) != src or socket.inet_ntoa(packet[16:20]) != dip:
                continue
            if struct.unpack("!H", packet[ihl + 2:ihl + 4])[0] != dport:
                continue
            # The capture may hold a checksum the sender left to the NIC (veth offloads it);
            # 0 means none for UDP over IPv4. The payload goes out unchanged.
            packet = packet[:ihl + 6] + b"\0\0" + packet[ihl + 8:]
            send_ip(packet, dip)
            print(len(packet) - ihl - 8)
            return
    sys.exit(f"no packet from {src} to {dst} on {iface} within 30 s")


def main() -> None:
    mode = sys.argv[1]
    if mode == "forge":
        src, dst, payload = sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
        send_ip(forge(src, dst, payload), parse(dst)[0])
    elif mode == "replay":
        replay(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
