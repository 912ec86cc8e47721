# gpucluster test rig: bring simulated hosts and the shared services up and down.
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ggufmodel
import ollamaimage
import realengine
import realmodel
import sglangimage
import shapemodel
import rigimage
import tinymodel
import webuiimage
from rigutil import CACHE, HERE, log, run, stage, wait_for

SUBNET = "10.77.0"
BRIDGE = "gcrig0"
CONTROL = SUBNET + ".1"
NS_PREFIX = "gcrig-"
SERVICES = {"reg": SUBNET + ".2", "hf": SUBNET + ".3", "ms": SUBNET + ".4"}
REGISTRY_PORT = 5000
HF_PORT = 8090
OLAH_PORT = 18090
MS_PORT = 8080
CURRENT = "/run/gcrig/current"  # path of the live rig's state.json
IPT_TAG = "gcrig"
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STOP_TIMEOUT = 20


def host_addr(i):
    return "%s.%d" % (SUBNET, 10 + i)


def sh(*cmd, check=True):
    return run(list(cmd), check=check, quiet=True)


def netns_exists(ns):
    return os.path.exists("/run/netns/" + ns)


def link_exists(name):
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def spawn(ns, cmd, logfile, env=None, hostname=None):
    """Start a daemon inside a network namespace (nsenter --net, not `ip netns exec`: see rig-facts);
    with hostname, also in its own UTS namespace so the host has its own `hostname`."""
    f = open(logfile, "ab")
    full = ["nsenter", "--net=/run/netns/" + ns]
    if hostname:
        full += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    full += cmd
    p = subprocess.Popen(full, stdout=f, stderr=f, stdin=subprocess.DEVNULL, start_new_session=True,
                         env=env or clean_env(), close_fds=True)
    f.close()
    return p.pid


def clean_env(**extra):
    env = {"PATH": SYS_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(extra)
    return env


def ns_pids(ns):
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_pids(pids, timeout=STOP_TIMEOUT):
    pids = [p for p in pids if p and pid_alive(p)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(pid_alive(p) for p in pids):
        for p in pids:  # reap our own children if any
            try:
                os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)
    for p in pids:
        if pid_alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ network
def ipt(args, check=True):
    return subprocess.run(["iptables", "-w"] + args, capture_output=True, text=True, check=check)


def net_up(names):
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", CONTROL + "/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    c = ["-m", "comment", "--comment", IPT_TAG]
    # rig traffic stays on the rig LAN: allow bridge-to-bridge, drop anything the hosts would route elsewhere
    ipt(["-I", "FORWARD", "1", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"] + c)
    ipt(["-I", "FORWARD", "2", "-i", BRIDGE, "-j", "DROP"] + c)
    ipt(["-I", "FORWARD", "3", "-o", BRIDGE, "-j", "DROP"] + c)
    if ipt(["-nL", "DOCKER-USER"], check=False).returncode == 0:
        ipt(["-I", "DOCKER-USER", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"] + c)
    for ns, addr in names:
        veth = ns  # host side of the pair is named like the namespace (<= 15 chars)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", CONTROL)


def net_down():
    for line in ipt(["-S"], check=False).stdout.splitlines():
        parts = line.split()
        if IPT_TAG in parts and parts[0] == "-A":
            ipt(["-D"] + parts[1:], check=False)
    for name in sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []:
        if name.startswith(NS_PREFIX):
            stop_pids(ns_pids(name), timeout=5)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(NS_PREFIX):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    if link_exists(BRIDGE):
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


# ------------------------------------------------------------------ model + services
def prepare_model(d, model_id=tinymodel.MODEL_ID, fill=tinymodel.generate, origin="tests/rig/tinymodel.py"):
    """Publish a model repository through the HF mirror (git repo) and the ModelScope server; fill(src) writes
    the files and returns [{path, size, sha256}]."""
    src = os.path.join(d, "services", "hf-mirror", "models", *model_id.split("/"))
    files = fill(src)
    env = dict(clean_env(), GIT_AUTHOR_NAME="gpucluster rig", GIT_AUTHOR_EMAIL="rig@gpucluster.invalid",
               GIT_COMMITTER_NAME="gpucluster rig", GIT_COMMITTER_EMAIL="rig@gpucluster.invalid",
               GIT_AUTHOR_DATE="2024-11-21T00:00:00Z", GIT_COMMITTER_DATE="2024-11-21T00:00:00Z",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    g = ["git", "-C", src]
    run(g[:1] + ["init", "-q", "-b", "main", src], env=env, quiet=True)
    run(g + ["add", "-A"], env=env, quiet=True)
    run(g + ["commit", "-q", "-m", "%s (generated by %s)" % (model_id.split("/")[-1], origin)], env=env, quiet=True)
    sha = run(g + ["rev-parse", "HEAD"], env=env, capture=True).stdout.decode().strip()
    # ModelScope view: the same files, plus a bare repo for `git clone http://ms/models/<id>.git`
    ms_root = os.path.join(d, "services", "modelscope")
    owner, name = model_id.split("/")
    os.makedirs(os.path.join(ms_root, "models", owner), exist_ok=True)
    os.makedirs(os.path.join(ms_root, "git", owner), exist_ok=True)
    mdir = os.path.join(ms_root, "models", owner, name)
    os.makedirs(mdir)
    for f in files:
        os.link(os.path.join(src, f["path"]), os.path.join(mdir, f["path"]))
    bare = os.path.join(ms_root, "git", owner, name + ".git")
    run(["git", "clone", "-q", "--bare", src, bare], env=env, quiet=True)
    run(["git", "-C", bare, "branch", "-m", "main", "master"], env=env, quiet=True, check=False)
    run(["git", "-C", bare, "symbolic-ref", "HEAD", "refs/heads/master"], env=env, quiet=True)
    run(["git", "-C", bare, "update-server-info"], env=env, quiet=True)
    return {"id": model_id, "revision": sha, "files": files,
            "total_bytes": sum(f["size"] for f in files), "source_dir": src}


def _copy_model(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if not name.startswith(".") and os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return realmodel.file_list(dst)


def start_services(d, st):
    sv = os.path.join(d, "services")
    py = sys.executable
    # (a) registry mirror on the cached storage
    conf = os.path.join(sv, "registry.yml")
    rigimage.write_registry_config(conf, "%s:%d" % (SERVICES["reg"], REGISTRY_PORT))
    st["pids"].append(spawn(NS_PREFIX + "reg", ["docker-registry", "serve", conf], os.path.join(sv, "registry.log")))
    # (b) olah (offline, local git mirror) behind a counting proxy
    olah_dir = os.path.join(sv, "olah")
    os.makedirs(os.path.join(olah_dir, "repos"), exist_ok=True)
    toml = os.path.join(olah_dir, "olah.toml")
    with open(toml, "w") as f:
        f.write('[basic]\nhost = "127.0.0.1"\nport = %d\nssl-key = ""\nssl-cert = ""\nrepos-path = "%s"\n'
                'hf-scheme = "https"\nhf-netloc = "huggingface.co"\nhf-lfs-netloc = "cdn-lfs.huggingface.co"\n'
                'mirror-scheme = "http"\nmirror-netloc = "%s:%d"\nmirror-lfs-netloc = "%s:%d"\n'
                'mirrors-path = ["%s"]\n\n[accessibility]\noffline = true\n'
                % (OLAH_PORT, os.path.join(olah_dir, "repos"), SERVICES["hf"], HF_PORT, SERVICES["hf"], HF_PORT,
                   os.path.join(sv, "hf-mirror")))
    olah_cli = os.path.join(rigimage.olah_venv(), "bin", "olah-cli")
    st["pids"].append(spawn(NS_PREFIX + "hf", [olah_cli, "-c", toml, "--log-path", os.path.join(olah_dir, "logs")],
                            os.path.join(sv, "olah.log"), env=clean_env(HOME=olah_dir)))
    st["pids"].append(spawn(NS_PREFIX + "hf", [py, "-E", "-s", os.path.join(HERE, "logproxy.py"), SERVICES["hf"],
                                               str(HF_PORT), "127.0.0.1", str(OLAH_PORT),
                                               os.path.join(sv, "hf-access.log"), os.path.join(sv, "hf-fault")],
                            os.path.join(sv, "logproxy.log")))
    # (c) ModelScope-compatible server
    st["pids"].append(spawn(NS_PREFIX + "ms", [py, "-E", "-s", os.path.join(HERE, "modelscope_server.py"), SERVICES["ms"],
                                               str(MS_PORT), os.path.join(sv, "modelscope"),
                                               os.path.join(sv, "modelscope-access.log")],
                            os.path.join(sv, "modelscope.log")))


def in_ns_curl_ok(ns, url):
    return subprocess.run(["nsenter", "--net=/run/netns/" + ns, "curl", "-sf", "-o", "/dev/null", "--max-time", "2",
                           url], capture_output=True).returncode == 0


# ------------------------------------------------------------------ hosts
def host_paths(d, name):
    h = os.path.join(d, name)
    exec_root = os.path.join(h, "run")
    if len(exec_root) > 60:  # containerd's sockets live under exec-root; unix socket paths are short
        exec_root = "/run/gcrig/" + name
    return {"dir": h, "bin": os.path.join(h, "bin"), "daemon_bin": os.path.join(h, "daemon-bin"),
            "gpus": os.path.join(h, "gpus.json"), "models": os.path.join(h, "models"),
            "data_root": os.path.join(h, "docker"), "exec_root": exec_root,
            "sock": os.path.join(h, "docker.sock"), "pidfile": os.path.join(h, "docker.pid"),
            "dockerd_log": os.path.join(h, "dockerd.log"), "sshd_conf": os.path.join(h, "ssh", "sshd_config"),
            "sshd_log": os.path.join(h, "sshd.log"), "sshd_pid": os.path.join(h, "sshd.pid"),
            "hostkey": os.path.join(h, "ssh", "ssh_host_ed25519_key")}


def setup_host(d, i, name, a):
    p = host_paths(d, name)
    for k in ("bin", "daemon_bin", "models", "data_root", "exec_root"):
        os.makedirs(p[k], exist_ok=True)
    os.makedirs(os.path.dirname(p["hostkey"]), exist_ok=True)
    gpus = {"host": name, "count": a.gpus, "name": a.gpu_name, "memory_mib": a.gpu_memory_mib,
            "compute_capability": a.compute_capability, "driver": a.driver, "memory_used_mib": 0}
    with open(p["gpus"], "w") as f:
        json.dump(gpus, f, indent=1)
    shutil.copyfile(os.path.join(HERE, "nvidia_smi.py"), os.path.join(p["bin"], "nvidia-smi"))
    os.chmod(os.path.join(p["bin"], "nvidia-smi"), 0o755)
    shutil.copyfile(os.path.join(HERE, "gpu_hook.py"), os.path.join(p["daemon_bin"], "nvidia-container-runtime-hook"))
    os.chmod(os.path.join(p["daemon_bin"], "nvidia-container-runtime-hook"), 0o755)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@" + name, "-f", p["hostkey"]], quiet=True)
    docker_host = "unix://" + p["sock"]
    path = p["bin"] + ":" + SYS_PATH
    with open(p["sshd_conf"], "w") as f:
        f.write("# sshd of simulated host %s (gpucluster test rig)\n"
                "ListenAddress %s\nPort 22\nHostKey %s\nPidFile %s\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAuthorizedKeysFile %s\n"
                "PrintMotd no\nMaxStartups 100:30:200\nMaxSessions 100\nAcceptEnv LANG LC_*\n"
                "SetEnv DOCKER_HOST=%s PATH=%s GPUCLUSTER_RIG_HOST=%s SHLVL=1\n"
                "Subsystem sftp /usr/lib/openssh/sftp-server\n"
                % (name, host_addr(i), p["hostkey"], p["sshd_pid"], os.path.join(d, "authorized_keys"),
                   docker_host, path, name))
    return p, gpus


def start_host(d, i, name, p, st):
    ns = NS_PREFIX + name
    st["pids"].append(spawn(ns, ["/usr/sbin/sshd", "-D", "-e", "-f", p["sshd_conf"]], p["sshd_log"], hostname=name))
    st["dockerd"].append({"host": name, "sock": p["sock"], "pid": start_dockerd(name, p)})


def start_dockerd(name, p):
    """The host's dockerd; insecure (plain HTTP) registries: anything on the rig LAN (the registry mirror and the
    fault-injection servers tests start on this machine's rig address)."""
    denv = clean_env(PATH=p["daemon_bin"] + ":" + SYS_PATH)
    return spawn(NS_PREFIX + name, [
        "dockerd", "--data-root", p["data_root"], "--exec-root", p["exec_root"], "--pidfile", p["pidfile"],
        "-H", "unix://" + p["sock"], "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
        "--userland-proxy=false", "--insecure-registry", SUBNET + ".0/24",
        "--log-driver", "json-file", "--log-opt", "max-size=20m"], p["dockerd_log"], env=denv, hostname=name)


def restart_docker(dir_, name):
    """A host's dockerd stopped and started again, as after a reboot: its containers are left exited."""
    d = os.path.abspath(dir_)
    stp = os.path.join(d, "state.json")
    st = json.load(open(stp))
    entry = next((e for e in st["dockerd"] if e["host"] == name), None)
    if entry is None:
        raise SystemExit("rig restart-docker: no host %r in %s" % (name, d))
    stop_pids([entry["pid"]])
    p = host_paths(d, name)
    entry["pid"] = start_dockerd(name, p)
    save_state(d, st)
    wait_for(lambda: docker_ok(p["sock"]), 90, "dockerd on " + name)


def docker_ok(sock):
    return subprocess.run(["docker", "-H", "unix://" + sock, "version", "--format", "{{.Server.Version}}"],
                          capture_output=True, env=clean_env()).returncode == 0


def tcp_ok(ns, addr, port):
    return subprocess.run(["nsenter", "--net=/run/netns/" + ns, "bash", "-c", "exec 3<>/dev/tcp/%s/%d" % (addr, port)],
                          capture_output=True).returncode == 0


# ------------------------------------------------------------------ inventory / facts
def write_inventory(d, hosts, model, a):
    lines = ["# gpucluster inventory written by tests/rig/rig up (simulated hosts on this machine)",
             "cluster:", "  name: rig", "  ssh:", "    user: root", "    port: 22",
             "    identity_file: %s" % os.path.join(d, "id_ed25519"),
             "    known_hosts: %s" % os.path.join(d, "known_hosts"), "    accept_new_host_keys: false",
             "  model_dir: /Data/models", "  shared_model_dir: false",
             '  registry_mirrors: ["%s:%d"]' % (SERVICES["reg"], REGISTRY_PORT), "hosts:"]
    for h in hosts:
        g = h["gpus"]
        lines += ["  - name: %s" % h["name"], "    address: %s" % h["address"], "    interface: eth0",
                  "    model_dir: %s" % h["model_dir"],
                  '    gpus: {count: %d, name: "%s", memory_mib: %d, compute_capability: "%s", driver: "%s"}'
                  % (g["count"], g["name"], g["memory_mib"], g["compute_capability"], g["driver"])]
    lines += ["deploy:", "  profile: vllm-v0.3.0", "  model: %s" % model["id"], "  tensor_parallel: 2",
              "  source:", "    kind: hf-mirror", "    endpoint: http://%s:%d" % (SERVICES["hf"], HF_PORT), ""]
    path = os.path.join(d, "inventory.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ------------------------------------------------------------------ up / down
def up(a):
    d = os.path.abspath(a.dir)
    if a.hosts < 1 or a.hosts > 200:
        raise SystemExit("rig up: --hosts must be 1..200")
    missing = [t for t in ("dockerd", "docker", "sshd", "docker-registry", "nsenter", "git", "curl")
               if not shutil.which(t, path=SYS_PATH)]
    if missing or not os.path.exists(os.path.join(rigimage.olah_venv(), "bin", "olah-cli")):
        raise SystemExit("rig up: run `tests/rig/rig setup` first (missing: %s)" % (", ".join(missing) or "olah venv"))
    if os.path.isdir(d) and os.listdir(d) and not (os.path.exists(os.path.join(d, "state.json"))
                                                   or os.path.exists(os.path.join(d, "rig.json"))):
        raise SystemExit("rig up: %s is not empty and holds no rig; refusing to clear it" % d)
    with stage("images"):
        versions = rigimage.ensure_images()
        sglangimage.ensure()
        ollamaimage.ensure()
    with stage("remove previous rig"):
        prev = None
        if os.path.exists(CURRENT):
            prev = open(CURRENT).read().strip()
        if prev and os.path.exists(prev):
            down(os.path.dirname(prev), quiet=True)
        if os.path.exists(os.path.join(d, "state.json")):
            down(d, quiet=True)
        net_down()
        if os.path.isdir(d):
            _umount_under(d)
            for e in os.listdir(d):
                _rm(os.path.join(d, e))
    os.makedirs(d, exist_ok=True)
    os.makedirs("/run/gcrig", exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)
    st = {"dir": d, "pids": [], "dockerd": [], "created": time.time()}
    with open(CURRENT, "w") as f:
        f.write(os.path.join(d, "state.json"))
    save_state(d, st)
    names = ["h%d" % i for i in range(1, a.hosts + 1)]
    with stage("network (bridge %s, %d namespaces)" % (BRIDGE, len(names) + len(SERVICES))):
        net_up([(NS_PREFIX + s, addr) for s, addr in SERVICES.items()] +
               [(NS_PREFIX + n, host_addr(i)) for i, n in enumerate(names, 1)])
    with stage("model repository"):
        model = prepare_model(d)
        shape_model = prepare_model(d, shapemodel.MODEL_ID, fill=shapemodel.generate, origin="tests/rig/shapemodel.py")
        gguf_model = ggufmodel.publish(d)
        real = realengine.available()  # only after `rig setup --real-engine`
        real_model = None
        if real:
            real_model = prepare_model(d, realmodel.MODEL_ID, fill=lambda dst: _copy_model(real["model_dir"], dst),
                                       origin="tests/rig/realmodel.py")
    with stage("start services + hosts"):
        start_services(d, st)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpucluster-rig", "-f",
             os.path.join(d, "id_ed25519")], quiet=True)
        shutil.copyfile(os.path.join(d, "id_ed25519.pub"), os.path.join(d, "authorized_keys"))
        hosts, known = [], []
        for i, n in enumerate(names, 1):
            p, gpus = setup_host(d, i, n, a)
            start_host(d, i, n, p, st)
            save_state(d, st)
            with open(p["hostkey"] + ".pub") as f:
                kt, kb = f.read().split()[:2]
            known.append("%s %s %s" % (host_addr(i), kt, kb))
            hosts.append({"name": n, "address": host_addr(i), "netns": NS_PREFIX + n, "interface": "eth0",
                          "docker_host": "unix://" + p["sock"], "docker_socket": p["sock"],
                          "model_dir": p["models"], "bin_dir": p["bin"], "gpus_file": p["gpus"], "gpus": gpus,
                          "data_root": p["data_root"], "exec_root": p["exec_root"],
                          "sshd_log": p["sshd_log"], "dockerd_log": p["dockerd_log"], "host_key": p["hostkey"] + ".pub"})
        with open(os.path.join(d, "known_hosts"), "w") as f:
            f.write("\n".join(known) + "\n")
    with stage("wait for daemons"):
        wait_for(lambda: in_ns_curl_ok(NS_PREFIX + "reg", "http://%s:%d/v2/" % (SERVICES["reg"], REGISTRY_PORT)),
                 30, "registry")
        # probes that leave the mirrors' access logs empty for tests
        wait_for(lambda: tcp_ok(NS_PREFIX + "ms", SERVICES["ms"], MS_PORT), 30, "modelscope server")
        wait_for(lambda: in_ns_curl_ok(NS_PREFIX + "hf", "http://127.0.0.1:%d/api/models/%s/revision/main"
                                       % (OLAH_PORT, model["id"])), 60, "olah")
        wait_for(lambda: tcp_ok(NS_PREFIX + "hf", SERVICES["hf"], HF_PORT), 30, "hf access-log proxy")
        for h in hosts:
            wait_for(lambda: tcp_ok(h["netns"], h["address"], 22), 30, "sshd on " + h["name"])
        for h in hosts:
            wait_for(lambda: docker_ok(h["docker_socket"]), 90, "dockerd on " + h["name"])
    inv = write_inventory(d, hosts, model, a)
    sv = os.path.join(d, "services")
    reg = "%s:%d" % (SERVICES["reg"], REGISTRY_PORT)
    facts = {
        "dir": d, "inventory": inv, "cluster": "rig", "subnet": SUBNET + ".0/24", "bridge": BRIDGE,
        "control_address": CONTROL, "unused_address": SUBNET + ".250",
        "ssh": {"user": "root", "port": 22, "identity_file": os.path.join(d, "id_ed25519"),
                "known_hosts": os.path.join(d, "known_hosts")},
        "hosts": hosts,
        "registry": {"address": reg, "netns": NS_PREFIX + "reg", "log": os.path.join(sv, "registry.log"),
                     "images": {**{"vllm/vllm-openai:v%s" % v: "%s/vllm/vllm-openai:v%s" % (reg, v) for v in versions},
                                **{i: "%s/%s" % (reg, i) for i in (sglangimage.IMAGE, ollamaimage.IMAGE)}},
                     "versions": versions},
        "hf": {"endpoint": "http://%s:%d" % (SERVICES["hf"], HF_PORT), "netns": NS_PREFIX + "hf",
               "access_log": os.path.join(sv, "hf-access.log"), "olah_log": os.path.join(sv, "olah.log"),
               "repo_dir": model["source_dir"]},
        "modelscope": {"endpoint": "http://%s:%d" % (SERVICES["ms"], MS_PORT), "netns": NS_PREFIX + "ms",
                       "access_log": os.path.join(sv, "modelscope-access.log"),
                       "git_url": "http://%s:%d/models/%s.git" % (SERVICES["ms"], MS_PORT, model["id"])},
        "model": model,
        "shape_model": shape_model,
        "gguf_model": gguf_model,
        "cache_dir": CACHE,
    }
    if real:  # `rig setup --real-engine` ran: vLLM's CPU build and its model (the keys are absent otherwise)
        facts["real_engine"] = {"image": real["image"], "ref": "%s/%s" % (reg, real["image"]),
                                "version": real["version"], "size": real["size"]}
        facts["real_model"] = real_model
    webui = webuiimage.available()
    if webui:  # `rig setup --openwebui` ran: the real OpenWebUI (the key is absent otherwise)
        facts["openwebui"] = webui
    with open(os.path.join(d, "rig.json"), "w") as f:
        json.dump(facts, f, indent=1)
    st["hosts"] = [h["name"] for h in hosts]
    save_state(d, st)
    return inv


def save_state(d, st):
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(st, f, indent=1)


def _umount_under(d):
    targets = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == d or mp.startswith(d.rstrip("/") + "/") or mp.startswith("/run/gcrig/h"):
                targets.append(mp)
    for mp in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def _rm(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def live_elsewhere(d):
    """The state.json of a live rig in another directory, if any (there is one rig LAN per machine)."""
    try:
        cur = open(CURRENT).read().strip()
    except OSError:
        return None
    if cur and os.path.exists(cur) and os.path.dirname(cur) != d:
        return cur
    return None


def down(dir_, quiet=False):
    d = os.path.abspath(dir_)
    stp = os.path.join(d, "state.json")
    other = live_elsewhere(d)
    if other:
        log("down: the live rig is %s, not %s; leaving it alone" % (os.path.dirname(other), d))
        if os.path.exists(stp) or os.path.exists(os.path.join(d, "rig.json")):
            _umount_under(d)
            for e in os.listdir(d):
                _rm(os.path.join(d, e))
        return
    if os.path.isdir(d) and os.listdir(d) and not os.path.exists(stp) and not os.path.exists(os.path.join(d, "rig.json")):
        log("down: %s holds no rig; removing only the rig's network and namespaces" % d)
        net_down()
        return
    st = json.load(open(stp)) if os.path.exists(stp) else {"pids": [], "dockerd": []}
    with stage("containers"):
        for dk in st.get("dockerd", []):
            if pid_alive(dk["pid"]) and os.path.exists(dk["sock"]):
                env = clean_env()
                r = subprocess.run(["docker", "-H", "unix://" + dk["sock"], "ps", "-aq"], capture_output=True,
                                   text=True, env=env, timeout=30)
                ids = r.stdout.split()
                if ids:
                    subprocess.run(["docker", "-H", "unix://" + dk["sock"], "rm", "-f"] + ids, capture_output=True,
                                   env=env, timeout=120)
    with stage("daemons"):
        stop_pids([dk["pid"] for dk in st.get("dockerd", [])] + st.get("pids", []))
        # whatever else still runs inside the rig's namespaces (ssh sessions, shims) was started through the rig
        ns_left = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                   if n.startswith(NS_PREFIX)]
        left = [p for n in ns_left for p in ns_pids(n)]
        if left:
            stop_pids(left, timeout=5)
    with stage("network"):
        net_down()
    with stage("files"):
        _umount_under(d)
        if os.path.isdir(d):
            for e in os.listdir(d):
                _rm(os.path.join(d, e))
        shutil.rmtree("/run/gcrig", ignore_errors=True)


def status(dir_):
    p = os.path.join(os.path.abspath(dir_), "rig.json")
    if not os.path.exists(p):
        print("no rig at %s" % dir_)
        return 1
    print(open(p).read())
    return 0
