"""PURE: OpenWebUI in front of the deployment's endpoint (the inventory's `ui:`): its image pulled on the head through
the mirrors, one container there (node aux: `down` removes it after the heads), then readiness: /health from this
machine and OpenWebUI's own model list, which must show the served model. `status` reports the same two.

What OpenWebUI does was read from open-webui/open-webui's source (reference only, nothing is copied):
- Dockerfile: WORKDIR /app/backend, CMD ["bash", "start.sh"], PORT=8080, data in /app/backend/data (DATA_DIR);
  backend/start.sh: uvicorn on "${HOST:-0.0.0.0}" "${PORT:-8080}".
- backend/open_webui/config.py: OPENAI_API_BASE_URL / OPENAI_API_KEY (read when OPENAI_API_BASE_URLS / _KEYS are
  unset), ENABLE_OPENAI_API, ENABLE_OLLAMA_API, OLLAMA_BASE_URL; each a PersistentConfig: after the first start the
  values saved in its database win over the environment unless ENABLE_PERSISTENT_CONFIG=False (set here, so that a
  new endpoint, port or key reaches the UI on the next `up`).
- backend/open_webui/main.py: GET /health -> {"status": true}; GET /api/models -> {"data": [{"id": ...}]}, behind
  get_verified_user (utils/auth.py: a bearer token or the token cookie, else 403 "Not authenticated").
- routers/auths.py: POST /api/v1/auths/signin with WEBUI_AUTH=False answers a token for admin@localhost (created
  on first use, as the browser does) and refuses once other accounts exist (authentication cannot be turned off
  then: the docs' env-configuration page says so too).
- env.py OFFLINE_MODE (sets HF_HUB_OFFLINE=1, turns off the version check) and config.py *_AUTO_UPDATE: at every
  start OpenWebUI otherwise asks huggingface.co for its embedding model (RAG_EMBEDDING_MODEL_AUTO_UPDATE defaults to
  true; retrieval/utils.py get_model_path) and again during chats. The official image carries them in its data
  folder (a host-path ui.data hides them: then no local RAG embeddings offline); a lab network that
  drops outside traffic made the first /health wait 277 s instead of 20 s (open-webui 0.6.36 from PyPI, DNS and
  HTTPS blackholed). So OFFLINE_MODE=True here; ui.env.OFFLINE_MODE: "False" gives the downloads back.

Run against the real open-webui 0.6.36 (tests/rig/webuiimage.py; tests/e2e/webui_browser.py drives it in Chromium):
this env, `bash start.sh`, PROBE's sign-in and /api/models (it lists the served model and OpenWebUI's own
"arena-model")."""

from __future__ import annotations

import json
from typing import Callable

from .checks import WARNING, Finding
from .config import Secret
from .containers import ContainerSpec, container_step, secrets_digest, secrets_put, split_env, with_secrets
from .deployment import Deployment
from .errors import ConfigError
from .steps import CONTROL, Http, Step, Wait

ROLE = "openwebui"
DATA = "/app/backend/data"           # the image's DATA_DIR (chats, accounts, settings: webui.db)
START_TIMEOUT = 600                  # first start: database migrations before /health answers
LIST_TIMEOUT = 300

# Runs inside the UI container (its own python3) with "$1" its port, "$2" the model id to find, "$3" off|on (ui.auth).
# off: sign in as OpenWebUI's one user, then its own /api/models (refresh=true: not its cached list).
# on:  there is no account to sign in with: ask the backend OpenWebUI is configured with, with its own URL and key
#      (the key from the container's mounted 0600 file): what its model list is made of, from where it runs.
# Prints one JSON line ({"via", "models"} or {"error"}), then the verdict; exits 0 only when the model is listed.
PROBE = r'''
import json, os, sys, urllib.error, urllib.request
port, want, auth = sys.argv[1], sys.argv[2], sys.argv[3]


def get(url, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
        return json.loads(r.read().decode() or "null")


def secret(key):
    try:
        with open("/run/gpucluster/env") as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("=")
                if k == key:
                    return v
    except OSError:
        pass
    return None


def done(doc, line, rc):
    print(json.dumps(doc))
    print(line)
    sys.exit(rc)


try:
    if auth == "off":
        base = "http://127.0.0.1:" + port
        token = get(base + "/api/v1/auths/signin", {"email": "", "password": ""})["token"]
        via, doc = "openwebui", get(base + "/api/models?refresh=true", token=token)
        ids = [m.get("id") for m in doc.get("data", [])]
    elif os.environ.get("ENABLE_OLLAMA_API") == "True":
        via, doc = "ollama", get(os.environ["OLLAMA_BASE_URL"].rstrip("/") + "/api/tags")
        ids = [m.get("model") for m in doc.get("models", [])]
    else:
        url = os.environ["OPENAI_API_BASE_URL"].rstrip("/") + "/models"
        via, doc = "backend", get(url, token=secret("OPENAI_API_KEY"))
        ids = [m.get("id") for m in doc.get("data", [])]
except urllib.error.HTTPError as e:
    text = e.read().decode(errors="replace")[:200]
    hint = ("; OpenWebUI has accounts in its data, so it cannot run without login: set ui.auth: true, or give "
            "it a new ui.data") if e.code == 400 and "signin" in e.url else ""
    done({"error": f"HTTP {e.code}"}, f"{e.url}: HTTP {e.code}: {text}{hint}", 1)
except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    done({"error": str(e)[:200]}, f"no answer yet: {e}", 1)
ids = [str(i) for i in ids if i is not None]
if want in ids or want.lower() in [i.lower() for i in ids]:
    done({"via": via, "models": ids}, f"ok: {want} is listed ({via})", 0)
done({"via": via, "models": ids}, f"{want} is not listed ({via}: {', '.join(ids) or 'no models'})", 1)
'''


def url(d: Deployment) -> str:
    return f"http://{d.head.address}:{d.inventory.ui.port}"


def listed_name(d: Deployment) -> str:
    """The id OpenWebUI lists the served model under (Ollama's /api/tags name, `:latest` added, for Ollama)."""
    if d.engine.name != "ollama":
        return d.served_name
    from . import gguf
    try:
        return gguf.parse(d.served_name).listed
    except ValueError:
        return d.served_name


def validate(d: Deployment) -> None:
    """Refuse a UI port another listener of the head already takes (both on the host network)."""
    ui, inv = d.inventory.ui, d.inventory
    if ui is None:
        return
    taken = {d.port: "the engine's API port (deploy.port / the profile's port)",
             inv.cluster.transfer_port: "cluster.transfer_port (model copies)"}
    if ui.port in taken:
        raise ConfigError(f"port {ui.port} is {taken[ui.port]} on {d.head.name}: OpenWebUI needs its own",
                          file=inv.path, line=inv.lines.get("ui.port") or inv.lines.get("ui"), field="ui.port",
                          fix="choose another ui.port, e.g. 3000")


def env(d: Deployment) -> dict[str, str | Secret]:
    """The container's environment: the connection to the endpoint (OpenAI API, or Ollama's own for Ollama), the
    port, auth, env-over-database, no downloads from huggingface.co (OFFLINE_MODE); ui.env (which may turn that
    back on); the API key (a Secret: it goes to the mounted file, never `-e`)."""
    ui = d.inventory.ui
    out: dict[str, str | Secret] = {"PORT": str(ui.port), "WEBUI_AUTH": str(ui.auth),
                                    "ENABLE_PERSISTENT_CONFIG": "False", "OFFLINE_MODE": "True"}
    if d.engine.name == "ollama":      # Ollama's native API (tags, ps in the UI); its OpenAI API would list it twice
        out.update(ENABLE_OLLAMA_API="True", OLLAMA_BASE_URL=d.base_url, ENABLE_OPENAI_API="False")
    else:                              # no Ollama: else OpenWebUI keeps trying its default http://localhost:11434
        out.update(ENABLE_OPENAI_API="True", OPENAI_API_BASE_URL=d.endpoint, ENABLE_OLLAMA_API="False")
    out.update(ui.env)
    if d.api_key is not None:
        out["OPENAI_API_KEY"] = d.api_key
    return out


def data_source(d: Deployment) -> str:
    """A named volume by default (kept by `down`: the chats and accounts survive a redeploy), or ui.data."""
    return d.inventory.ui.data or f"gpucluster-{d.cluster}-{ROLE}"


def container(d: Deployment) -> ContainerSpec:
    ui = d.inventory.ui
    plain, secrets = split_env(env(d))
    # the image's own start: `bash start.sh` in its WORKDIR /app/backend (Dockerfile CMD)
    spec = ContainerSpec(cluster=d.cluster, role=ROLE, node="aux", image=ui.image, entrypoint="bash",
                         command=("start.sh",), env=tuple(sorted(plain.items())),
                         mounts=((data_source(d), DATA, "rw"),), network="host", ipc=None, gpus=None)
    if not secrets:
        return spec
    return with_secrets(spec, file=d.secrets_file("ui"), digest_=secrets_digest(secrets, d.cluster))


def containers(d: Deployment) -> dict[str, list[ContainerSpec]]:
    """Host name -> the UI's container (so `up`'s stray check leaves it)."""
    return {d.head.name: [container(d)]} if d.inventory.ui is not None else {}


def probe_argv(d: Deployment) -> tuple[str, ...]:
    return ("docker", "exec", container(d).name, "python3", "-c", PROBE, str(d.inventory.ui.port), listed_name(d),
            "on" if d.inventory.ui.auth else "off")


def steps(d: Deployment) -> list[Step]:
    """After the engine is ready: the image on the head, the container, /health from here, the model listed."""
    ui = d.inventory.ui
    if ui is None:
        return []
    from .plan import image_refs, pull_step   # plan imports this module
    head, spec = d.head.name, container(d)
    secrets = split_env(env(d))[1]
    files = (secrets_put(d.secrets_file("ui"), secrets),) if secrets else ()
    alive = ("docker", "exec", spec.name, "true")
    log = ("docker", "logs", "--tail", "20", spec.name)
    where = (f"{ui.port}, OpenAI API at {d.endpoint}" if d.engine.name != "ollama"
             else f"{ui.port}, Ollama API at {d.base_url}")
    listing = ("OpenWebUI's /api/models (signed in as its one user: ui.auth is false)" if not ui.auth else
               "the backend OpenWebUI is configured with, asked from its container (ui.auth: no account to sign in)")
    return [
        pull_step(head, ui.image, image_refs(ui.image, [*d.inventory.cluster.registry_mirrors, *ui.registry_mirrors]),
                  id=f"{head}/ui-image", phase="ui"),
        container_step(spec, host=head, phase="ui", files=files,
                       reason=f"OpenWebUI on port {where}, login {'on' if ui.auth else 'off'}, data in "
                              f"{data_source(d)}"),
        Step(id="control/ui-health", host=CONTROL, phase="ui-health", readonly=True,
             reason=f"wait until OpenWebUI answers /health at {url(d)}",
             ops=(Http(url=f"{url(d)}/health", expect='"status":true', until=START_TIMEOUT, abort=(head, alive),
                       log=(head, log)),)),
        Step(id=f"{head}/ui-models", host=head, phase="ui-ready", readonly=True,
             reason=f"{listing} lists {listed_name(d)!r}",
             ops=(Wait(argv=probe_argv(d), timeout=LIST_TIMEOUT, interval=5, abort=alive, log=log),)),
    ]


def findings(d: Deployment) -> list[Finding]:
    ui = d.inventory.ui
    if ui is None:
        return []
    out = []
    if not ui.auth and d.api_key is not None:
        out.append(Finding(code="ui-open", severity=WARNING,
                           message=f"ui.auth is false: whoever reaches {url(d)} uses the model without "
                                   "deploy.api_key, and as OpenWebUI's one user (its admin) can read the key in "
                                   "its connection settings",
                           fix="ui.auth: true (OpenWebUI's accounts: the first to sign up is the admin), or keep "
                               "the UI's port on a trusted network"))
    out += [Finding(code="secret-unset", severity=WARNING, message=f"ui.env.{k} is read from ${v.env}, which is not "
                    "set here; the UI's secrets file cannot be written",
                    fix=f"export {v.env}=... before `gpucluster up`")
            for k, v in ui.env.items() if isinstance(v, Secret) and v.env and v.digest("") == "unset"]
    return out


def status(d: Deployment, run: Callable, get: Callable) -> tuple[dict, list[str]]:
    """({url, health, healthy, models, via}, problems): /health from here, the model list from the head's container.
    `run(host, argv)` runs a read-only probe; `get(url)` is (status, text)."""
    code, _ = get(f"{url(d)}/health")
    out: dict = {"url": url(d), "health": code == 200, "healthy": False, "models": [], "via": None}
    if code != 200:
        return out, [f"ui: OpenWebUI at {url(d)} does not answer /health ({f'HTTP {code}' if code else 'no answer'})"]
    try:
        r = run(d.head.name, probe_argv(d))
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        doc = json.loads(lines[0]) if lines else {}
    except Exception as e:  # noqa: BLE001 - a probe that cannot run is this report's problem, not a crash
        return out, [f"ui: cannot ask OpenWebUI for its models on {d.head.name}: {e}"]
    if isinstance(doc, dict):
        out["models"] = [str(m) for m in doc.get("models") or [] if isinstance(m, str)]
        out["via"] = doc.get("via") if isinstance(doc.get("via"), str) else None
    out["healthy"] = r.rc == 0
    return out, [] if r.rc == 0 else [f"ui: {lines[-1][:300] if lines else f'the model probe exited {r.rc}'}"]
