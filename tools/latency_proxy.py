"""A loopback TCP proxy, in its own process, that holds every HTTP request for a fixed delay.

Put in front of the GCS emulator it turns a same-machine server (sub-millisecond answers) into
something closer to a real bucket, where each request waits tens of milliseconds: a loader that
reads one record at a time shows it at once. A request is the first bytes a client sends after the
server last answered (or on a new connection); the rest of the same request passes straight on.

    proxy = LatencyProxy(target_port=server.port, delay_s=0.05)
    ... point clients at proxy.url ...
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time


class LatencyProxy:
    def __init__(self, target_port: int, delay_s: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen([sys.executable, __file__, str(self.port), str(target_port),
                                       str(delay_s)], stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return
            if time.time() > deadline or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError("latency proxy did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)
        self._proc.kill()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, before) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            await before()
            writer.write(data)
            await writer.drain()
    writer.close()


async def _connection(client_r, client_w, target_port: int, delay_s: float) -> None:
    try:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        client_w.close()
        return
    answered = asyncio.Event()
    answered.set()  # the first bytes on a connection start a request

    async def hold_new_request() -> None:
        if answered.is_set():
            answered.clear()
            await asyncio.sleep(delay_s)

    async def mark_answered() -> None:
        answered.set()

    await asyncio.gather(_pipe(client_r, server_w, hold_new_request),
                         _pipe(server_r, client_w, mark_answered), return_exceptions=True)


async def _serve(port: int, target_port: int, delay_s: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, target_port, delay_s), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
