# gpucluster test rig: counting HTTP reverse proxy in front of olah (the HF mirror); logs one JSON line per request.
"""python3 logproxy.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT LOGFILE [FAULTFILE]

Each line of LOGFILE: {"ts", "client", "method", "path", "status", "bytes"} where bytes is the body length
sent to the client. Bodies are buffered whole (the rig's model is a few MB).

Fault injection (tests write FAULTFILE; absent or empty: no fault), one word and an optional count N:
  `503 [N]`   answer 503 Service Unavailable (to the next N requests, else to all)
  `stall [N]` accept the request and send nothing for 600 s (the next N requests, else all)"""
import http.client
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rigutil import AccessLog   # run as `python3 -E -s tests/rig/<this file>`: its folder is on sys.path

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
       "proxy-authenticate", "content-length"}


def main():
    lh, lp, uh, up, logfile = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    access = AccessLog(logfile)
    faultfile = sys.argv[6] if len(sys.argv) > 6 else None
    lock = threading.Lock()

    def fault():
        """The fault for this request ('' for none), counting down a limited one."""
        if not faultfile:
            return ""
        with lock:
            try:
                words = open(faultfile).read().split()
            except OSError:
                return ""
            if not words:
                return ""
            if len(words) > 1:
                left = int(words[1])
                if left <= 0:
                    return ""
                with open(faultfile, "w") as f:
                    f.write("%s %d\n" % (words[0], left - 1))
            return words[0]

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _proxy(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            f = fault()
            if f == "stall":
                time.sleep(600)
                return
            if f == "503":
                data = b"injected fault: service unavailable"
                self.send_response(503)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                access.write(self, 503, len(data))
                return
            hdrs = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn = http.client.HTTPConnection(uh, up, timeout=300)
            try:
                conn.request(self.command, self.path, body=body, headers=hdrs)
                r = conn.getresponse()
                data = r.read() if self.command != "HEAD" else b""
                self.send_response(r.status, r.reason)
                for k, v in r.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    cl = r.getheader("Content-Length")
                    if cl is not None:
                        self.send_header("Content-Length", cl)
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if data:
                    self.wfile.write(data)
                status = r.status
            except Exception as e:  # upstream down: answer 502
                data = ("bad gateway: %s" % e).encode()
                self.send_response(502)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                status = 502
            finally:
                conn.close()
            access.write(self, status, len(data))

        do_GET = do_HEAD = do_POST = do_PUT = _proxy

    s = ThreadingHTTPServer((lh, lp), H)
    s.daemon_threads = True
    s.serve_forever()


if __name__ == "__main__":
    main()
