#!/usr/bin/env python3
"""The only bridge between the host's loopback and the real node's network namespace.

The real node (containerd, the kubelet and its Pods) lives in a network namespace that
hack/env creates; the control plane, NATS and Jaeger stay on the host's 127.0.0.1.
One process, two kinds of tunnel, no per-connection processes:

  --forward PORT=HOSTPORT   listen on 0.0.0.0:PORT inside the namespace (Pods reach it
                            on the bridge gateway address, the kubelet on 127.0.0.1)
                            and dial 127.0.0.1:HOSTPORT on the host: the API server,
                            NATS and the OTLP receiver as Pods see them.
  --egress SOCKET           an HTTP CONNECT proxy on a unix socket for the API
                            server's egress selector: kubectl logs/exec/port-forward
                            and probes of the API server's own reach the kubelet and
                            Pods from inside the namespace, so nothing on the host
                            ever dials a node or Pod address.

Sockets keep the network namespace they were created in: the process enters the
node's namespace (setns) only to create a socket there, then returns.
"""
import argparse
import asyncio
import ctypes
import ipaddress
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    def __init__(self, path):
        self.node = os.open(path, os.O_RDONLY)
        self.host = os.open("/proc/self/ns/net", os.O_RDONLY)

    def socket(self, family=socket.AF_INET):
        """A TCP socket that belongs to the node's namespace."""
        self._enter(self.node)
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        finally:
            self._enter(self.host)
        s.setblocking(False)
        return s

    @staticmethod
    def _enter(fd):
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)} (node-proxy must run as root)")


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()


async def splice(r1, w1, r2, w2):
    await asyncio.gather(pipe(r1, w2), pipe(r2, w1))
    for w in (w1, w2):
        w.close()


async def serve_forward(ns, port, host_port):
    async def on_conn(reader, writer):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", host_port)
        except OSError as e:
            print(f"node-proxy: forward :{port} -> 127.0.0.1:{host_port}: {e}", file=sys.stderr, flush=True)
            writer.close()
            return
        await splice(reader, writer, r2, w2)

    lsock = ns.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(512)
    return await asyncio.start_server(on_conn, sock=lsock)


async def serve_egress(ns, path):
    loop = asyncio.get_running_loop()

    async def on_conn(reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, OSError):
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        err = None
        if len(parts) != 3 or parts[0] != "CONNECT":
            err = f"400 only CONNECT is supported, got {line!r}"
        else:
            host, _, port = parts[1].rpartition(":")
            host = host.strip("[]")
            try:
                addr = ipaddress.ip_address(host)
                port = int(port)
            except ValueError:
                addr, err = None, f"400 CONNECT needs a numeric address (the API server dials nodes by InternalIP here), got {parts[1]!r}"
        if err is None:
            s = ns.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET)
            try:
                await asyncio.wait_for(loop.sock_connect(s, (str(addr), port)), 10)
            except (OSError, asyncio.TimeoutError) as e:
                s.close()
                err = f"502 {addr}:{port} in the node's namespace: {e or 'timed out'}"
        if err is not None:
            writer.write(f"HTTP/1.1 {err}\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        r2, w2 = await asyncio.open_connection(sock=s)
        await splice(reader, writer, r2, w2)

    if os.path.exists(path):
        os.unlink(path)
    return await asyncio.start_unix_server(on_conn, path=path)


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netns", required=True, help="the node's namespace, e.g. /run/netns/orderpipeline-XXXX")
    ap.add_argument("--forward", action="append", default=[], metavar="PORT=HOSTPORT")
    ap.add_argument("--egress", metavar="SOCKET", help="unix socket of the CONNECT proxy")
    ap.add_argument("--ready-file", help="written once every listener is up")
    a = ap.parse_args()
    ns = Netns(a.netns)
    servers = []
    for f in a.forward:
        port, _, host_port = f.partition("=")
        servers.append(await serve_forward(ns, int(port), int(host_port)))
    if a.egress:
        servers.append(await serve_egress(ns, a.egress))
    if a.ready_file:
        open(a.ready_file, "w").close()
    print(f"node-proxy: forwards {a.forward}, egress {a.egress}", file=sys.stderr, flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
