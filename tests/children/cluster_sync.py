"""A synchronous cluster worker: http.server, heartbeats from its own loop with cluster.heartbeat().

argv: PORT. /block/S blocks the (single-threaded) server loop S seconds.
"""

import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from forkio import cluster


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/block/"):
            time.sleep(float(self.path.rsplit("/", 1)[1]))
        body = f"sync {os.getpid()} {cluster.worker}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(HTTPServer):
    def service_actions(self) -> None:  # runs on every turn of serve_forever's loop
        cluster.heartbeat()


def serve() -> None:
    sock = cluster.listen(("127.0.0.1", int(sys.argv[1])))
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    cluster.heartbeat()  # watched from now on (the loop's first turn may already block)
    print(f"listening {cluster.worker}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()


if __name__ == "__main__":
    cluster.run(serve, workers=2, timeout=2)
