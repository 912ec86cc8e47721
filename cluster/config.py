"""Inventory and profile schema: strict loading with file:line errors and did-you-mean."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from importlib import resources
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


# ---------------------------------------------------------------- secrets
class Secret:
    """A value that renders as *** everywhere; `reveal()` only at execution."""

    def __init__(self, *, literal: str | None = None, env: str | None = None, file: str | None = None):
        self._literal, self.env, self.file = literal, env, file

    def reveal(self) -> str:
        if self._literal is not None:
            return self._literal
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} is not set",
                                  fix=f"export {self.env}=... before running")
            return value
        path = Path(self.file).expanduser()
        try:
            return path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read secret file {path}: {e.strerror}") from None

    def digest(self, salt: str) -> str:
        """A salted digest of the value (for spec hashes: a rotated secret changes the hash), or "unset"."""
        try:
            value = self.reveal()
        except ConfigError:
            return "unset"
        return hashlib.sha256(f"{salt}\0{value}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._literal, self.env, self.file) == (
            other._literal, other.env, other.file)

    def __hash__(self) -> int:
        return hash((self._literal, self.env, self.file))


# An env key that names a secret (a whole `_`-separated part of it): its literal value is a Secret too.
# HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, OPENAI_API_KEY yes; TOKENIZERS_PARALLELISM, MAX_TOKENS no.
SECRET_KEY = re.compile(r"(?:^|_)(?:TOKEN|SECRETS?|PASSWORDS?|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIALS?)(?:_|$)",
                        re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")   # what the secrets file's reader can export


def secret_key(key: str) -> bool:
    """Does this env key name a secret (so that a literal value under it is one)?"""
    return bool(SECRET_KEY.search(key))


# ---------------------------------------------------------------- schema
SSH_USER = r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*$"
SSH_PATH = r'^(?!.*\$\{)[^\x00-\x1f\x7f"]+$'   # ssh_config quotes it: no control character, double quote, ${


@dataclass(frozen=True, kw_only=True)
class SSH:
    # user, port, identity_file, known_hosts: None means what your ssh config says (ssh -G), as plain `ssh` does
    user: str | None = field(default=None, metadata={"pattern": SSH_USER})
    port: int | None = field(default=None, metadata={"range": (1, 65535)})
    identity_file: str | None = field(default=None, metadata={"pattern": SSH_PATH})
    known_hosts: str | None = field(default=None, metadata={"pattern": SSH_PATH})
    accept_new_host_keys: bool = False
    connect_timeout: float = field(default=10.0, metadata={"range": (0.1, 600)})
    config: str | None = field(default=None, metadata={"pattern": SSH_PATH})   # else $GPUCLUSTER_SSH_CONFIG


@dataclass(frozen=True, kw_only=True)
class SSHOverride:
    host: str | None = field(default=None, metadata={"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"})   # what ssh dials
    user: str | None = field(default=None, metadata={"pattern": SSH_USER})
    port: int | None = field(default=None, metadata={"range": (1, 65535)})
    identity_file: str | None = field(default=None, metadata={"pattern": SSH_PATH})
    known_hosts: str | None = field(default=None, metadata={"pattern": SSH_PATH})
    accept_new_host_keys: bool | None = None
    connect_timeout: float | None = None


@dataclass(frozen=True, kw_only=True)
class GPUs:
    count: int = field(metadata={"range": (1, 64)})
    name: str | None = None
    memory_mib: int = field(metadata={"range": (256, 10_000_000)})
    compute_capability: str = field(metadata={"pattern": r"^\d+\.\d$"})
    driver: str | None = field(default=None, metadata={"pattern": r"^\d+(\.\d+)*$"})


@dataclass(frozen=True, kw_only=True)
class Host:
    name: str = field(metadata={"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"})
    address: str
    gpus: GPUs | None = None       # required unless the profile is for CPUs (device: cpu)
    role: Literal["head", "worker"] | None = None
    interface: str | None = field(default=None, metadata={"pattern": r"^[A-Za-z0-9_.:@-]{1,15}$"})
    model_dir: str | None = field(default=None, metadata={"pattern": r"^/[^\x00-\x1f\x7f]*$"})
    ssh: SSHOverride | None = None
    # this host's engine processes only (after deploy.env); a value may be a secret (_env_value)
    env: dict[str, str | Secret] = field(default_factory=dict, metadata={"env": "secrets"})


@dataclass(frozen=True, kw_only=True)
class Cluster:
    name: str = field(metadata={"pattern": r"^[a-z0-9][a-z0-9-]{0,39}$"})
    ssh: SSH = field(default_factory=SSH)
    model_dir: str = field(default="/data/models", metadata={"pattern": r"^/[^\x00-\x1f\x7f]*$"})
    shared_model_dir: bool = False
    registry_mirrors: list[str] = field(default_factory=list)
    transfer_port: int = field(default=29650, metadata={"range": (1024, 65535)})   # head -> hosts model copies
    # lan: the image leaves the registry mirrors once (the head) and reaches the other hosts over the LAN
    image_fanout: Literal["lan", "mirror"] = "lan"


@dataclass(frozen=True, kw_only=True)
class Fallback:
    """Another hub to download from when the source's retries are spent (a mirror down, 5xx, stalls, 404)."""

    kind: Literal["hf-mirror", "huggingface", "modelscope"]
    endpoint: str | None = field(default=None, metadata={"pattern": r"^https?://"})
    revision: str | None = None
    token: Secret | None = None


@dataclass(frozen=True, kw_only=True)
class Source:
    kind: Literal["hf-mirror", "huggingface", "modelscope", "local"] = "hf-mirror"
    endpoint: str | None = field(default=None, metadata={"pattern": r"^https?://"})
    revision: str | None = None
    token: Secret | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    download_on: Literal["host", "control"] = "host"
    fallbacks: list[Fallback] = field(default_factory=list)     # tried in order after the source


@dataclass(frozen=True, kw_only=True)
class Deploy:
    profile: str | None = field(default=None, metadata={"pattern": r"^[^\x00-\x1f\x7f]+$"})   # None: auto
    model: str = field(metadata={"pattern": r"^[^\x00-\x1f\x7f]+$"})
    served_model_name: str | None = field(default=None, metadata={"pattern": r"^[^\x00-\x1f\x7f]+$"})
    tensor_parallel: int | None = field(default=None, metadata={"range": (1, 512)})
    pipeline_parallel: int | None = field(default=None, metadata={"range": (1, 64)})
    engine_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str | Secret] = field(default_factory=dict, metadata={"env": "secrets"})   # secrets: _env_value
    port: int | None = field(default=None, metadata={"range": (1, 65535)})
    api_key: Secret | None = None
    source: Source = field(default_factory=Source)


# OpenWebUI's image, pinned (ghcr.io tags carry the `v`). Its env names, /health, /api/models and the sign-in without
# accounts (WEBUI_AUTH=False) were read from open-webui/open-webui's source (backend/open_webui/{main,config}.py,
# routers/auths.py, Dockerfile, backend/start.sh); see cluster/ui.py.
OPENWEBUI_IMAGE = "ghcr.io/open-webui/open-webui:v0.6.36"
IMAGE_REF = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
UI_MANAGED_ENV = ("PORT", "HOST", "DATA_DIR", "WEBUI_AUTH", "ENABLE_PERSISTENT_CONFIG", "ENABLE_OPENAI_API",
                  "OPENAI_API_BASE_URL", "OPENAI_API_BASE_URLS", "OPENAI_API_KEY", "OPENAI_API_KEYS",
                  "ENABLE_OLLAMA_API", "OLLAMA_BASE_URL", "OLLAMA_BASE_URLS")


@dataclass(frozen=True, kw_only=True)
class UI:
    """A web UI in front of the deployment's endpoint, on the head (cluster/ui.py)."""

    kind: Literal["openwebui"]
    port: int = field(default=3000, metadata={"range": (1, 65535)})
    image: str = field(default=OPENWEBUI_IMAGE, metadata={"pattern": IMAGE_REF})
    registry_mirrors: list[str] = field(default_factory=list)   # after cluster.registry_mirrors (prefix: m.daocloud.io)
    auth: bool = False            # OpenWebUI's WEBUI_AUTH: false = no login (one shared user), true = its accounts
    data: str | None = field(default=None, metadata={"pattern": r"^(/[^\x00-\x1f\x7f:]*|[A-Za-z0-9][A-Za-z0-9_.-]*)$"})
    env: dict[str, str | Secret] = field(default_factory=dict, metadata={"env": "secrets"})   # as deploy.env


@dataclass(frozen=True, kw_only=True)
class Inventory:
    cluster: Cluster
    hosts: list[Host]
    deploy: Deploy
    ui: UI | None = None          # optional: OpenWebUI in front of the endpoint (cluster/ui.py)
    path: str = field(default="", metadata={"internal": True})
    lines: dict = field(default_factory=dict, metadata={"internal": True}, compare=False, repr=False)

    @property
    def head(self) -> Host:
        return next((h for h in self.hosts if h.role == "head"), self.hosts[0])

    def ssh_for(self, host: Host) -> SSH:
        over = {k: v for k, v in dataclasses.asdict(host.ssh).items() if v is not None and k != "host"} \
            if host.ssh else {}
        return dataclasses.replace(self.cluster.ssh, **over)

    def model_dir_for(self, host: Host) -> str:
        return host.model_dir or self.cluster.model_dir

    def secrets(self) -> list[tuple[str, Secret]]:
        """Every secret of the deployment, by the field that holds it (ui.env's are the UI's: cluster/ui.py)."""
        d = self.deploy
        named = [("deploy.api_key", d.api_key), ("deploy.source.token", d.source.token),
                 *((f"deploy.source.fallbacks[{i}].token", f.token) for i, f in enumerate(d.source.fallbacks)),
                 *((f"deploy.env.{k}", v) for k, v in d.env.items() if isinstance(v, Secret)),
                 *((f"hosts[{i}].env.{k}", v) for i, h in enumerate(self.hosts) for k, v in h.env.items()
                   if isinstance(v, Secret))]
        return [(f, s) for f, s in named if s is not None]


VERSION_PATTERN = r"^\d+\.\d+\.\d+(\.\d+)?(\.post\d+)?$"


@dataclass(frozen=True, kw_only=True)
class DockerOptions:
    shm_size: str | None = field(default=None, metadata={"pattern": r"^\d+(\.\d+)?[bkmgBKMG]?$"})
    ipc: str | None = "host"
    network: str = "host"
    privileged: bool = False
    gpus: str = "all"


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str = ""                             # default: the file stem
    engine: str = "vllm"                       # an engine plugin (cluster/engines)
    device: Literal["gpu", "cpu"] = "gpu"      # cpu: a CPU build of the engine; hosts need no GPUs
    version: str = field(default="", metadata={"pattern": VERSION_PATTERN})   # default: from the image tag
    image: str
    registry_mirrors: list[str] = field(default_factory=list)
    docker: DockerOptions = field(default_factory=DockerOptions)
    env: dict[str, str] = field(default_factory=dict, metadata={"env": "plain"})   # shared and recorded: no secrets
    engine_args: dict[str, Any] = field(default_factory=dict)
    port: int = field(default=8000, metadata={"range": (1, 65535)})
    path: str = field(default="", metadata={"internal": True})
    lines: dict = field(default_factory=dict, metadata={"internal": True}, compare=False, repr=False)


# ---------------------------------------------------------------- YAML with line numbers
class _Map(dict):
    """A YAML mapping that remembers the line of each key."""

    line: int = 0
    lines: dict


class _Seq(list):
    line: int = 0
    lines: list


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    pass


def _construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1,
                              fix="keep one of them")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; syntax errors become one ConfigError with file:line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path), fix="check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", file=str(path), fix="save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(str(e).split(": ", 1)[-1], file=str(path), line=e.line) from None
    except yaml.YAMLError as e:
        # An unclosed [ or { is reported where parsing gave up; its opening line is the useful one.
        flow = "flow" in str(getattr(e, "context", "") or "")
        mark = (getattr(e, "context_mark", None) if flow else None) or getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML: {problem}", file=str(path),
                          line=mark.line + 1 if mark else None) from None


# ---------------------------------------------------------------- the strict builder
@dataclass(frozen=True)
class _At:
    file: str
    path: str
    line: int | None

    def child(self, key: Any, container: Any) -> "_At":
        line = None
        if isinstance(container, _Map):
            line = container.lines.get(key)
        elif isinstance(container, _Seq) and isinstance(key, int) and key < len(container.lines):
            line = container.lines[key]
        sub = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else str(key))
        return _At(self.file, sub, line or self.line)

    def error(self, message: str, fix: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line, field=self.path or None, fix=fix)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    kind = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__
    return f"{kind} {value!r}" if not isinstance(value, (dict, list)) else f"{kind} {dict(value) if isinstance(value, dict) else list(value)!r}"


def _convert(tp: Any, value: Any, at: _At, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise at.error("a value is required")
        if len(args) == 1:
            return _convert(args[0], value, at, meta)
        return value  # Scalar-like unions are checked by their users
    if value is None:
        raise at.error("a value is required")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use one of: " + ", ".join(map(str, choices))
            raise at.error(f"{value!r} is not allowed", fix=hint)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise at.error(f"expected a list, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, at.child(i, value), {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise at.error(f"expected a mapping, got {_describe(value)}")
        if meta.get("env"):
            return {str(k): _env_value(str(k), v, at.child(k, value), secrets=meta["env"] == "secrets")
                    for k, v in value.items()}
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, at.child(k, value), {}) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is Secret:
        return _secret(value, at)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, at)
    if tp is bool:
        if not isinstance(value, bool):
            raise at.error(f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise at.error(f"expected an integer, got {_describe(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise at.error(f"expected a number, got {_describe(value)}")
        value = float(value)
    elif tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise at.error(f"expected a string, got {_describe(value)}")
        value = str(value)
    lo_hi = meta.get("range")
    if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
        raise at.error(f"{value} is out of range", fix=f"use a value from {lo_hi[0]} to {lo_hi[1]}")
    pattern = meta.get("pattern")
    if pattern and not re.search(pattern, value):
        raise at.error(f"{value!r} is not valid", fix=f"it must match {pattern}")
    return value


def _secret(value: Any, at: _At) -> Secret:
    if isinstance(value, str):
        return Secret(literal=value)
    if isinstance(value, dict) and len(value) == 1 and set(value) <= {"env", "file"}:
        (kind, ref), = value.items()
        if isinstance(ref, str) and ref:
            return Secret(**{kind: ref})
    raise at.error("expected a string, {env: NAME} or {file: PATH}")


def _env_value(key: str, value: Any, at: _At, *, secrets: bool) -> str | Secret:
    """An env value: a string; or a Secret, given as {env: NAME} / {file: PATH} or as a literal under a key that
    names a secret (secret_key). A secret never reaches an argv or a container's config (docs/schema.md)."""
    if not isinstance(value, dict) and not secret_key(key):
        return _convert(str, value, at, {})
    if not secrets:
        raise at.error(f"{key} is a secret, and a profile's env is shared and recorded on the hosts",
                       fix=f"set it in the inventory instead: deploy.env: {{{key}: {{env: {key}}}}}")
    if not ENV_NAME.fullmatch(key):
        raise at.error("a secret's key must be a variable name (letters, digits, _)", fix="rename it")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _secret(value, at)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, at: _At) -> Any:
    if not isinstance(data, dict):
        raise at.error(f"expected a mapping, got {_describe(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            raise at.child(key, data).error(
                "unknown key", fix=f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], at.child(name, data), dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise at.error(f"missing required key {name!r}")
    return cls(**kwargs)


# ---------------------------------------------------------------- loading
def _root(data: Any, file: str) -> _At:
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top, got {_describe(data)}", file=file, line=1)
    return _At(file, "", getattr(data, "line", 1))


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file."""
    file = str(path)
    data = read_yaml(path)
    at = _root(data, file)
    inv = _build(Inventory, data, at)
    hosts_at = at.child("hosts", data)
    if not inv.hosts:
        raise hosts_at.error("at least one host is required")
    seen_names: dict[str, int] = {}
    seen_addrs: dict[str, int] = {}
    for i, host in enumerate(inv.hosts):
        h_at = hosts_at.child(i, data["hosts"])
        try:
            ipaddress.ip_address(host.address)
        except ValueError:   # Ray, NCCL/GLOO, routes and interfaces all compare IPs: a name would pass the plan
            raise h_at.child("address", data["hosts"][i]).error(
                f"{host.address!r} is not an IP address (the other hosts and the engine use it as one)",
                fix=f"put the IP the other hosts reach {host.name} on here, and a host name or ~/.ssh/config "
                    f"alias in hosts[{i}].ssh.host") from None
        for value, seen, what in ((host.name, seen_names, "name"), (host.address, seen_addrs, "address")):
            if value in seen:
                raise h_at.child(what, data["hosts"][i]).error(
                    f"duplicate host {what} {value!r} (also hosts[{seen[value]}])",
                    fix=f"give every host its own {what}")
            seen[value] = i
    heads = [h.name for h in inv.hosts if h.role == "head"]
    if len(heads) > 1:
        raise hosts_at.error(f"more than one host has role: head ({', '.join(heads)})", fix="mark one host as head")
    engine_at = at.child("deploy", data).child("engine_args", data["deploy"])
    _check_engine_args(inv.deploy.engine_args, engine_at)
    deploy = data["deploy"]
    lines = {**_lines(deploy, "deploy"), **_lines(deploy.get("engine_args"), "deploy.engine_args"),
             **_lines(deploy.get("env"), "deploy.env")}
    for i, h in enumerate(data["hosts"]):   # env secrets are checked (and reported) where they are written
        lines.update(_lines(h.get("env"), f"hosts[{i}].env"))
    if "source" in deploy:
        _check_tokens(inv.deploy.source, at.child("deploy", data).child("source", deploy), deploy["source"])
    if inv.ui is not None:
        _check_ui(inv.ui, at.child("ui", data), data["ui"])
        lines.update({**_lines(data["ui"], "ui"), **_lines(data["ui"].get("env"), "ui.env")})
    return dataclasses.replace(inv, path=file, lines=lines)


def _check_tokens(source: Source, at: _At, data: dict) -> None:
    """A hub token goes only to an endpoint the user chose: never to the public default mirror (hf-mirror.com)."""
    fallbacks = data.get("fallbacks") or []
    for s, where in ((source, at), *((f, at.child("fallbacks", data).child(i, fallbacks))
                                     for i, f in enumerate(source.fallbacks))):
        if s.token is not None and s.kind == "hf-mirror" and not s.endpoint:
            raise where.error("a token would go to the public default mirror https://hf-mirror.com, which you did "
                              "not choose", fix="set endpoint: to the mirror you trust with it (or kind: huggingface)")


def _check_ui(ui: UI, at: _At, data: dict) -> None:
    """What the UI's schema cannot say: mirrors are registry hosts, and gpucluster sets the connection env itself."""
    mirrors = data.get("registry_mirrors") or []
    for i, m in enumerate(ui.registry_mirrors):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*(:\d+)?(/[A-Za-z0-9._-]+)*", m):
            raise at.child("registry_mirrors", data).child(i, mirrors).error(
                f"{m!r} is not a registry (host[:port][/path])", fix="e.g. m.daocloud.io or 10.77.0.2:5000")
    env = data.get("env") or {}
    for key in ui.env:
        if key in UI_MANAGED_ENV:
            raise at.child("env", data).child(key, env).error(
                f"gpucluster sets {key} itself (the endpoint, its key, the port, ui.auth)",
                fix="remove it: ui.port, ui.auth and deploy.api_key / deploy.port decide these")


def flag_name(key: str) -> str:
    """Normalise an engine-arg key: no leading dashes, dashes not underscores."""
    return key.lstrip("-").replace("_", "-")


def _check_engine_args(args: dict[str, Any], at: _At) -> None:
    for key, value in args.items():
        ok = isinstance(value, (str, int, float, bool)) or (
            isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value))
        if not ok:
            raise at.child(key, args).error(f"expected a scalar or a list of scalars, got {_describe(value)}")


def _lines(data: Any, prefix: str) -> dict[str, int]:
    """`prefix.key` -> line for each key of a mapping read from YAML."""
    return {f"{prefix}.{k}": line for k, line in getattr(data, "lines", {}).items()}


SHIPPED_PROFILES = resources.files("cluster") / "profiles"   # in the wheel; a link to ../profiles in a checkout


def _profile_folders() -> list[Path]:
    return [Path.cwd() / "profiles", Path(str(SHIPPED_PROFILES))]


def profile_path(ref: str, *, base: Path | None = None) -> Path:
    """A profile reference is a file path, or a name under ./profiles or the shipped profiles."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        p = Path(ref).expanduser()
        return p if p.is_absolute() or base is None else (base / p if (base / p).exists() else p)
    for folder in _profile_folders():
        if (folder / f"{ref}.yaml").exists():
            return folder / f"{ref}.yaml"
    return _profile_folders()[-1] / f"{ref}.yaml"


def available_profiles() -> list[str]:
    return sorted({p.stem for folder in _profile_folders() if folder.is_dir() for p in folder.glob("*.yaml")})


def load_profile(ref: str, *, inventory: Inventory | None = None) -> Profile:
    """Find and validate a profile by name or path."""
    base = Path(inventory.path).parent if inventory and inventory.path else None
    path = profile_path(ref, base=base)
    if not path.exists():
        names = available_profiles()
        close = difflib.get_close_matches(ref, names, n=1)
        raise ConfigError(f"profile {ref!r} not found",
                          file=inventory.path if inventory else None, field="deploy.profile",
                          line=inventory.lines.get("deploy.profile") if inventory else None,
                          fix=f"did you mean {close[0]!r}?" if close else "available: " + ", ".join(names))
    data = read_yaml(path)
    at = _root(data, str(path))
    profile = _build(Profile, data, at)
    _check_engine_args(profile.engine_args, at.child("engine_args", data))
    lines = {"engine": data.lines.get("engine"), **_lines(data.get("engine_args"), "engine_args")}
    version = profile.version or _version_from_image(profile.image, at.child("image", data))
    _check_version_known(profile.engine, version, at.child("version" if profile.version else "image", data))
    return dataclasses.replace(profile, name=profile.name or path.stem, version=version, path=str(path), lines=lines)


def image_version(image: str) -> str | None:
    """The release an image tag names: `vllm/vllm-openai:v0.8.5.post1` -> `0.8.5.post1` (None if none)."""
    ref = image.split("@", 1)[0]
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return None
    tag = tag[1:] if tag[:1] in "vV" else tag
    tag = re.sub(r"-(cu|rocm)\d+(-[A-Za-z0-9]+)*$", "", tag)   # SGLang's build suffix: v0.4.6.post4-cu124
    return tag if re.match(VERSION_PATTERN, tag) else None


def _version_from_image(image: str, at: _At) -> str:
    version = image_version(image)
    if version is None:
        raise at.error(f"cannot tell the engine version from image {image!r}",
                       fix="add version: X.Y.Z, or use a release tag such as vllm/vllm-openai:v0.8.5.post1")
    return version


def _check_version_known(engine: str, version: str, at: _At) -> None:
    from . import engines, knowledge   # engine data only where a profile is read
    try:
        plugin = engines.get(engine)
    except ConfigError:
        return   # an unknown engine is reported where the plan asks for it
    known = plugin.versions()
    if known and version not in known:
        raise at.error(f"no engine data for {engine} {version} ({len(known)} releases known: {known[0]} .. "
                       f"{known[-1]})", fix="use one of the nearest: " + ", ".join(
                           knowledge.nearest_versions(known, version)))


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML scalars (0.95, true, 4096)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE", fix="e.g. --set gpu-memory-utilization=0.95")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        if not isinstance(value, (str, int, float, bool)):
            value = raw
        out[key.strip()] = value
    return out
