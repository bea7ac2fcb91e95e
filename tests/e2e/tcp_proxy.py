"""A TCP proxy on loopback that can cut the link like a network partition:
while cut, bytes in both directions are held back (connections stay open
and hang, nothing is refused), exactly what a broker sees when a switch
drops its packets. Healing lets the held bytes through. `cut(refuse=True)`
instead resets every connection and refuses new ones (a server that is
down). Threads only; it
stops with `close()` (or at interpreter exit: its threads are daemons)."""

import socket
import threading


class Proxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.closed = False
        self.refusing = False
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self):
        return "127.0.0.1:%d" % self.port

    def cut(self, refuse: bool = False):
        if refuse:
            self.refusing = True
            socks, self.socks = self.socks, []
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass
        else:
            self.open.clear()

    def heal(self):
        self.refusing = False
        self.open.set()

    def close(self):
        self.closed = True
        self.open.set()
        for s in [self.listener] + self.socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        while not self.closed:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            # Held while cut; bounded by the test's own deadlines.
            while not self.open.wait(0.5):
                if self.closed:
                    return
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
