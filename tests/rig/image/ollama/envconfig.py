# stand-in for Ollama's envconfig (gpucluster test rig): reads the environment as Ollama 0.32.15 does, per envconfig.json.
"""Go's strconv.ParseBool / ParseUint / time.ParseDuration, the Var() trimming and Host(), enough to give each
variable the value the real server would use, and the warnings it would log."""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DEFS = json.load(open(os.path.join(HERE, "envconfig.json")))
TRUE = ("1", "t", "T", "TRUE", "true", "True")
FALSE = ("0", "f", "F", "FALSE", "false", "False")
UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
FOREVER = float("inf")


def var(env, key):
    return env.get(key, "").strip().strip("\"'")


def parse_bool(s):
    """strconv.ParseBool: (value, ok)."""
    if s in TRUE:
        return True, True
    if s in FALSE:
        return False, True
    return None, False


def parse_duration(s):
    """time.ParseDuration in seconds, or None. Go needs a unit except for "0"."""
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    body = s[1:] if s[:1] in "+-" else s
    if not body:
        return None
    pos, total = 0, 0.0
    while pos < len(body):
        m = DURATION.match(body, pos)
        if not m:
            return None
        total += float(m.group(1)) * UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_uint(s):
    return int(s) if re.fullmatch(r"\d+", s) and int(s) < 1 << 64 else None


def load(env):
    """{key: value Ollama uses}, [warning lines as the real server logs them]."""
    vals, warns = {}, []
    for key, d in DEFS["vars"].items():
        s, kind, default = var(env, key), d["kind"], d["default"]
        if kind == "bool":
            if s == "":
                vals[key] = default
            else:
                b, ok = parse_bool(s)
                vals[key] = b if ok else True          # BoolWithDefault: unparseable means true
        elif kind in ("uint", "uint64"):
            n = parse_uint(s) if s else None
            if s and n is None:
                warns.append('level=WARN msg="invalid environment variable, using default" key=%s value=%s '
                             'default=%s' % (key, s, default))
            vals[key] = default if n is None else n
        elif kind == "duration":
            secs = parse_duration(s) if s else None
            if s and secs is None and re.fullmatch(r"[+-]?\d+", s):
                secs = float(int(s))
            if secs is None:
                secs = parse_duration(default)
            vals[key] = FOREVER if secs < 0 else secs
        elif kind == "host":
            vals[key], w = host(s)
            warns += w
        else:
            vals[key] = s or default
    return vals, warns


def host(s):
    """envconfig.Host(): ((scheme, host, port), warnings)."""
    default_port, warns = "11434", []
    if "://" in s:
        scheme, hostport = s.split("://", 1)
        default_port = {"http": "80", "https": "443"}.get(scheme, default_port)
    else:
        scheme, hostport = "http", s
    hostport = hostport.split("/", 1)[0]
    m = re.fullmatch(r"\[?([^\[\]]*?)\]?:([^:]*)", hostport) if hostport.count(":") <= 1 or hostport.startswith("[") \
        else None
    if m:
        h, port = m.group(1), m.group(2)
    else:
        h, port = (hostport or "127.0.0.1").strip("[]"), default_port
    if not re.fullmatch(r"\d+", port or "") or int(port) > 65535:
        warns.append('level=WARN msg="invalid port, using default" port=%s default=%s' % (port, default_port))
        port = default_port
    return (scheme, h or "", int(port)), warns
