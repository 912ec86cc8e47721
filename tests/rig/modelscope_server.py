# ModelScope-compatible model server for gpucluster's test rig (stdlib only): the two file endpoints the modelscope client needs, plus dumb-HTTP git.
"""python3 modelscope_server.py HOST PORT ROOT LOGFILE

ROOT/models/<owner>/<name>/           model files (served by the API)
ROOT/git/<owner>/<name>.git/          bare git repo (served as /models/<owner>/<name>.git/..., dumb HTTP)

Endpoints:
  GET /api/v1/models/{owner}/{name}/repo/files?Revision=master&Recursive=True
  GET /api/v1/models/{owner}/{name}/repo?Revision=master&FilePath={path}
Every request is logged to LOGFILE as a JSON line {"ts", "client", "method", "path", "status", "bytes"}."""
import hashlib
import json
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rigutil import AccessLog   # run as `python3 -E -s tests/rig/<this file>`: its folder is on sys.path

_sha_cache = {}


def sha256_of(path):
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def main():
    host, port, root, logfile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    access = AccessLog(logfile)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _reply(self, code, body, ctype="application/json", extra=None):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            sent = 0
            if self.command != "HEAD":
                self.wfile.write(body)
                sent = len(body)
            access.write(self, code, sent)

        def _err(self, code, msg):
            self._reply(code, {"Code": code, "Message": msg, "Success": False, "RequestId": "rig"})

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            q = {k.lower(): v[0] for k, v in urllib.parse.parse_qs(u.query).items()}
            parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
            if parts[:1] == ["v2"]:   # Ollama's registry protocol, as modelscope.cn answers `ollama pull`
                import ggufmodel
                code, ctype, body = ggufmodel.registry(os.path.join(root, "models"), parts)
                if isinstance(body, str):
                    with open(body, "rb") as f:
                        body = f.read()
                return self._reply(code, body, ctype)
            if len(parts) >= 6 and parts[:3] == ["api", "v1", "models"] and parts[5] == "repo":
                owner, name = parts[3], parts[4]
                mdir = os.path.realpath(os.path.join(root, "models", owner, name))
                if not os.path.isdir(mdir):
                    return self._err(404, "model %s/%s not found" % (owner, name))
                rev = q.get("revision", "master")
                if rev not in ("master", "main", "v1.0.0"):
                    return self._err(404, "revision %s not found" % rev)
                if len(parts) == 7 and parts[6] == "files":
                    files = []
                    for dp, dns, fns in os.walk(mdir):
                        dns[:] = sorted(d for d in dns if not d.startswith("."))
                        for fn in sorted(fns):
                            p = os.path.join(dp, fn)
                            rel = os.path.relpath(p, mdir)
                            files.append({"Name": fn, "Path": rel, "Type": "blob", "Size": os.path.getsize(p),
                                          "Sha256": sha256_of(p), "Revision": "rig", "Mode": "33188",
                                          "CommitMessage": "rig", "CommittedDate": 1700000000,
                                          "IsLFS": fn.endswith(".safetensors"), "Id": sha256_of(p)[:40]})
                    return self._reply(200, {"Code": 200, "Success": True, "Message": "success",
                                             "RequestId": "rig", "Data": {"Files": files}})
                if len(parts) == 6:
                    fp = q.get("filepath")
                    if not fp:
                        return self._err(400, "FilePath required")
                    p = os.path.realpath(os.path.join(mdir, fp))
                    if not p.startswith(mdir + os.sep) or not os.path.isfile(p):
                        return self._err(404, "file %s not found" % fp)
                    with open(p, "rb") as f:
                        data = f.read()
                    return self._reply(200, data, "application/octet-stream",
                                       {"Content-Disposition": "attachment; filename=%s" % os.path.basename(fp)})
            if len(parts) >= 3 and parts[0] == "models" and parts[2].endswith(".git"):
                gdir = os.path.realpath(os.path.join(root, "git", parts[1], parts[2]))
                p = os.path.realpath(os.path.join(gdir, *parts[3:]))
                if p.startswith(gdir) and os.path.isfile(p):
                    with open(p, "rb") as f:
                        return self._reply(200, f.read(), "application/octet-stream")
            self._err(404, "not found: %s" % u.path)

        do_HEAD = do_GET

    s = ThreadingHTTPServer((host, port), H)
    s.daemon_threads = True
    s.serve_forever()


if __name__ == "__main__":
    main()
