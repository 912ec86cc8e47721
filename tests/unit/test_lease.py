"""The cluster lease: the real check/take/renew/release scripts run with /bin/sh against a temp folder (the lease's
expiry written by hand where a test needs the past), the control side's take/renew/release around a run, and the
runbook's lease sections."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from cluster import lease as leases
from cluster import ops, render
from cluster.errors import LOCKED, LockHeld, RemoteError
from cluster.steps import CONTROL, Cmd, Step, decide


def _lease(tmp: Path, token: str, **kw) -> leases.Lease:
    base = dict(cluster="lab", host=CONTROL, command="up", owner=f"op-{token[:4]}@ctl", pid=4242, token=token,
                root=str(tmp / "state"))
    return leases.Lease(**{**base, **kw})


def sh(argv) -> subprocess.CompletedProcess:
    assert argv[0] == "sh"
    return subprocess.run(["/bin/sh", *argv[1:]], capture_output=True, text=True, timeout=60)


def check(lease: leases.Lease):
    take, _ = lease.steps()
    r = sh(take[0].check.argv)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return decide(take[0], r.returncode, r.stdout)


def fields(lease: leases.Lease) -> dict[str, str]:
    return dict(line.split("=", 1) for line in Path(lease.path).read_text().splitlines())


def write(lease_path: str, **values) -> None:
    """A lease written by hand (as another control machine left it)."""
    Path(lease_path).parent.mkdir(parents=True, exist_ok=True)
    Path(lease_path).write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def now() -> int:
    return int(time.time())


def test_no_lease_the_check_says_run_and_the_take_writes_the_owner(tmp_path):
    a = _lease(tmp_path, "aaaa0001", ttl=90)
    d = check(a)
    assert d.action == "run" and d.why == "take the lease (none held)"
    r = sh(a.take_argv())
    assert r.returncode == 0 and "took the lease" in r.stdout, r.stdout + r.stderr
    f = fields(a)
    assert f["token"] == "aaaa0001" and f["owner"] == "op-aaaa@ctl" and f["pid"] == "4242" and f["command"] == "up"
    assert int(f["expires"]) - int(f["renewed"]) == 90 and abs(int(f["start"]) - now()) <= 5
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700        # the state folder: not world-readable
    assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "state")) == ["lab.lease", "lab.lease.lock"]   # no temp file left


def test_a_live_lease_of_another_operation_fails_in_one_line_naming_it(tmp_path):
    b = _lease(tmp_path, "bbbb0002", command="down", pid=777)
    assert sh(b.take_argv()).returncode == 0
    a = _lease(tmp_path, "aaaa0001")
    d = check(a)
    assert d.action == "fail" and d.why.startswith(leases.MARK)
    assert "op-bbbb@ctl pid 777 (gpucluster down), started " in d.why and "--break-lock" in d.why
    assert "\n" not in d.why and "expires in " in d.why
    r = sh(a.take_argv())                          # the take itself refuses too (a taker that raced the check)
    assert r.returncode == 1 and r.stdout.strip().startswith("fail held by op-bbbb@ctl")
    assert fields(a)["token"] == "bbbb0002"


def test_an_expired_lease_is_taken_over_naming_its_owner_and_last_renewal(tmp_path):
    a = _lease(tmp_path, "aaaa0001")
    t = now()
    write(a.path, token="dead0000", owner="gone@laptop", pid=99, command="up", start=t - 1000, renewed=t - 400,
          expires=t - 310)
    d = check(a)
    assert d.action == "run" and d.why.startswith("take over the stale lease of gone@laptop pid 99 (gpucluster up)")
    assert "last renewed 40" in d.why and "expired 3" in d.why      # 400 s and 310 s ago (a second may pass)
    assert sh(a.take_argv()).returncode == 0
    assert fields(a)["token"] == "aaaa0001" and int(fields(a)["expires"]) > now()


def test_a_corrupt_lease_counts_as_expired(tmp_path):
    a = _lease(tmp_path, "aaaa0001")
    write(a.path, garbage="$(touch PWNED)")
    assert check(a).why.startswith("take over the stale lease")
    assert sh(a.take_argv()).returncode == 0 and fields(a)["token"] == "aaaa0001"
    assert not list(tmp_path.rglob("PWNED"))


def test_break_lock_takes_a_live_lease_and_says_whose(tmp_path):
    b = _lease(tmp_path, "bbbb0002", command="model pull")
    assert sh(b.take_argv()).returncode == 0
    a = _lease(tmp_path, "aaaa0001", break_lock=True)
    d = check(a)
    assert d.action == "run" and d.why.startswith("break the live lease of op-bbbb@ctl pid 4242 (gpucluster model pull)")
    assert sh(a.take_argv()).returncode == 0 and fields(a)["token"] == "aaaa0001"


def test_two_concurrent_takers_exactly_one_wins(tmp_path):
    takers = [_lease(tmp_path, f"{i:04d}cafe") for i in range(6)]
    start = threading.Barrier(len(takers))
    rcs: dict[str, int] = {}

    def take(lease):
        start.wait()
        rcs[lease.token] = sh(lease.take_argv()).returncode
    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [tok for tok, rc in rcs.items() if rc == 0]
    assert len(winners) == 1 and sorted(rcs.values()) == [0] + [1] * (len(takers) - 1)
    assert fields(takers[0])["token"] == winners[0]


def test_renew_extends_only_this_operations_own_lease(tmp_path):
    a = _lease(tmp_path, "aaaa0001", ttl=90)
    assert sh(a.take_argv()).returncode == 0
    f = fields(a)
    write(a.path, **{**f, "renewed": now() - 80, "expires": now() + 10})
    r = sh(a.renew_argv())
    assert r.stdout.startswith("ok renewed until") and int(fields(a)["expires"]) >= now() + 85
    assert fields(a)["start"] == f["start"]                        # the start stays; only renewed/expires move

    b = _lease(tmp_path, "bbbb0002")
    before = Path(a.path).read_text()
    r = sh(b.renew_argv())
    assert r.returncode == 0 and r.stdout.startswith("lost the lease is now held by op-aaaa@ctl")
    assert Path(a.path).read_text() == before                     # never written by one that does not own it

    os.unlink(a.path)                                             # broken and released: never resurrected
    assert sh(a.renew_argv()).stdout.startswith("lost the lease was removed")
    assert not Path(a.path).exists()


def test_release_removes_only_this_operations_own_lease(tmp_path):
    a, b = _lease(tmp_path, "aaaa0001"), _lease(tmp_path, "bbbb0002")
    assert sh(b.take_argv()).returncode == 0
    r = sh(a.release_argv())
    assert r.returncode == 0 and r.stdout.startswith("left alone") and fields(b)["token"] == "bbbb0002"
    assert sh(b.release_argv()).stdout.strip() == "released" and not Path(b.path).exists()
    assert sh(b.release_argv()).stdout.strip() == "no lease to release"


def test_hostile_owner_values_stay_one_line_each(tmp_path):
    a = _lease(tmp_path, "aaaa0001", owner="x\nexpires=99999999999\n$(touch PWNED)", command="up`touch PWNED`")
    assert sh(a.take_argv()).returncode == 0
    f = fields(a)
    assert f["owner"] == "xexpires=99999999999$(touch PWNED)" and int(f["expires"]) < now() + 200
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    with pytest.raises(ValueError):
        _lease(tmp_path, "not hex; rm -rf /")


# ---------------------------------------------------------------- the control side: Held
def test_held_takes_renews_and_releases(tmp_path):
    a = _lease(tmp_path, "aaaa0001", ttl=3)
    said: list[str] = []
    with leases.Held(a, None, progress=said.append, notice=said.append, interval=0.3) as held:
        first = int(fields(a)["renewed"])
        time.sleep(1.5)
        assert int(fields(a)["renewed"]) > first                  # renewed from the thread
        report = held.executor.execute([Step(id="control/x", host=CONTROL, phase="work", reason="r",
                                             ops=(Cmd(argv=("true",)),))])
    assert [o.status for o in report.outcomes] == ["ran"]
    assert [o.step.id for o in held.taken.outcomes] == ["control/lock"] and held.taken.outcomes[0].status == "ran"
    assert [o.step.id for o in held.released.outcomes] == ["control/unlock"]
    assert not Path(a.path).exists()
    assert not any("warning" in s or "could not" in s for s in said), said


def test_held_refuses_a_live_lease_with_lockheld(tmp_path):
    b = _lease(tmp_path, "bbbb0002", command="down")
    assert sh(b.take_argv()).returncode == 0
    with pytest.raises(LockHeld) as e:
        with leases.Held(_lease(tmp_path, "aaaa0001"), None):
            pytest.fail("the block must not run")
    assert e.value.exit_code == LOCKED
    text = str(e.value)
    assert text.startswith("cluster lab: the lease on control is held by op-bbbb@ctl pid 4242 (gpucluster down)")
    assert "--break-lock" in text and fields(b)["token"] == "bbbb0002"


def test_held_says_once_whose_stale_lease_it_took_over(tmp_path):
    a = _lease(tmp_path, "aaaa0001")
    t = now()
    write(a.path, token="dead0000", owner="gone@laptop", pid=99, command="down", start=t - 500, renewed=t - 200,
          expires=t - 110)
    progress, notices = [], []
    with leases.Held(a, None, progress=progress.append, notice=notices.append):
        assert fields(a)["token"] == "aaaa0001"
    assert len(notices) == 1 and notices[0].startswith("control: take over the stale lease of gone@laptop pid 99")
    assert "last renewed 20" in notices[0]
    assert not any("take over" in p for p in progress), progress   # said once, as the notice


def test_a_broken_lease_stops_the_run_at_the_next_phase(tmp_path):
    a = _lease(tmp_path, "aaaa0001", ttl=30)
    thief = _lease(tmp_path, "bbbb0002", break_lock=True, owner="other@ctl", command="down")
    marker = tmp_path / "phase2-ran"
    steps = [Step(id="control/one", host=CONTROL, phase="one", reason="someone breaks the lease meanwhile",
                  ops=(Cmd(argv=thief.take_argv()), Cmd(argv=("sleep", "1.5")))),
             Step(id="control/two", host=CONTROL, phase="two", reason="must not run",
                  ops=(Cmd(argv=("touch", str(marker))),))]
    notices: list[str] = []
    with pytest.raises(leases.LeaseLost) as e:
        with leases.Held(a, None, notice=notices.append, interval=0.3) as held:
            held.executor.execute(steps)
    assert not marker.exists()
    assert "stopped before phase two" in str(e.value)
    assert "held by other@ctl" in str(e.value) and e.value.exit_code == LOCKED
    assert any("lost the cluster lease" in n for n in notices)
    assert fields(thief)["token"] == "bbbb0002"                  # the release left the new owner's lease alone


def test_held_releases_on_ctrl_c(tmp_path):
    a = _lease(tmp_path, "aaaa0001")
    with pytest.raises(KeyboardInterrupt):
        with leases.Held(a, None):
            assert Path(a.path).exists()
            raise KeyboardInterrupt
    assert not Path(a.path).exists()


def test_a_lease_that_cannot_be_taken_is_a_remote_error_unless_break_lock(tmp_path):
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "sub"                             # mkdir fails: not a folder
    with pytest.raises(RemoteError) as e:
        with leases.Held(_lease(tmp_path, "aaaa0001", root=str(root)), None):
            pytest.fail("the block must not run")
    assert "--break-lock" in str(e.value) and "<script" not in str(e.value) and "flock" not in str(e.value)
    notices: list[str] = []
    ran = []
    with leases.Held(_lease(tmp_path, "aaaa0001", root=str(root), break_lock=True), None, notice=notices.append):
        ran.append(True)
    assert ran and notices and notices[0].startswith("going on without the cluster lease (--break-lock)")


def test_release_failure_is_a_warning_not_an_error(tmp_path):
    a = _lease(tmp_path, "aaaa0001")
    notices: list[str] = []
    with leases.Held(a, None, notice=notices.append) as held:
        os.chmod(tmp_path / "state", 0o500)                     # (root ignores modes: then it is simply released)
    os.chmod(tmp_path / "state", 0o700)
    assert held.released.outcomes and (not notices or "expires by itself" in notices[0])


# ---------------------------------------------------------------- the views: plan, runbook
def _plan(tmp_path: Path):
    inv = {"cluster": {"name": "lab", "model_dir": "/Data/models"},
           "hosts": [{"name": f"h{i}", "address": f"10.0.0.{i + 1}", "interface": "eth0",
                      "gpus": {"count": 2, "name": "Tesla V100-PCIE-16GB", "memory_mib": 16160,
                               "compute_capability": "7.0"}} for i in range(2)],
           "deploy": {"profile": "vllm-v0.6.3", "model": "Qwen/Qwen2.5-7B-Instruct", "tensor_parallel": 2,
                      "pipeline_parallel": 2}}
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(inv))
    i, p = ops.load(str(path))
    return ops.make_plan(i, p)


def test_up_steps_put_the_lease_around_the_plan_on_the_head(tmp_path):
    p = _plan(tmp_path)
    take, body, release = ops.up_steps(p)
    assert [(s.id, s.phase, s.readonly) for s in take] == [("h0/lock", "lock", True)]
    assert [(s.id, s.phase, s.readonly) for s in release] == [("h0/unlock", "unlock", True)]
    assert body == list(p.steps)
    assert take[0].check.argv[3] == "/var/lib/gpucluster/lab.lease"


def test_runbook_lease_sections_take_and_release_and_refuse_a_live_lease(tmp_path):
    p = _plan(tmp_path)
    take, _, release = ops.up_steps(p, leases.for_operation(p.inventory, "up", root=str(tmp_path / "state")))
    text = render.runbook(p, [*take, *release])
    r = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "state") == ["lab.lease.lock"]         # taken, then released
    other = _lease(tmp_path, "bbbb0002", command="up")
    assert sh(other.take_argv()).returncode == 0
    r = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("held by op-bbbb@ctl") and "--break-lock" in r.stderr
    assert fields(other)["token"] == "bbbb0002"



# ---------------------------------------------------------------- the commands: each takes the lease
class FakeHosts:
    """Hosts whose lease scripts run here (the state folder under tmp_path); every other command answers `skip`."""

    def __init__(self, *a, **kw):
        self.ran: list[tuple[str, tuple[str, ...]]] = []

    def host(self, name):
        return name

    def run(self, host, argv, *, timeout=None):
        from cluster.executor import Result
        argv = tuple(argv)
        self.ran.append((host, argv))
        if argv[:2] == ("sh", "-c") and argv[2] in (leases.CHECK, leases.TAKE, leases.RENEW, leases.RELEASE):
            r = sh(argv)
            return Result(r.returncode, r.stdout, r.stderr)
        return Result(0, "skip not on this test's hosts\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def fake_hosts(tmp_path, monkeypatch):
    made: list[FakeHosts] = []

    def hosts(*a, **kw):
        made.append(FakeHosts())
        return made[-1]
    real = leases.for_operation
    monkeypatch.setattr(leases, "for_operation", lambda *a, **kw: real(*a, **{**kw, "root": str(tmp_path / "state")}))
    monkeypatch.setattr(ops, "_remote", lambda: __import__("types").SimpleNamespace(Hosts=hosts))
    import cluster.remote
    monkeypatch.setattr(cluster.remote, "Hosts", hosts)
    return made


def _inv(tmp_path: Path):
    return ops.load(str(_plan(tmp_path).inventory.path))


def test_down_takes_the_lease_and_refuses_a_live_one_unless_break_lock(tmp_path, fake_hosts):
    inv, _ = _inv(tmp_path)
    lease_path = tmp_path / "state" / "lab.lease"
    report = ops.down(inv)
    assert [o.step.id for o in report.outcomes][0] == "h0/lock" and report.outcomes[-1].step.id == "h0/unlock"
    assert not lease_path.exists()
    other = _lease(tmp_path, "bbbb0002", command="up")
    assert sh(other.take_argv()).returncode == 0
    dry = ops.down(inv, dry_run=True)                                   # the check only: never taken
    assert dry.outcomes[0].status == "would-fail" and dry.outcomes[0].why.startswith("held by op-bbbb@ctl")
    with pytest.raises(LockHeld, match=r"held by op-bbbb@ctl pid 4242 \(gpucluster up\).*--break-lock"):
        ops.down(inv)
    assert fields(other)["token"] == "bbbb0002"
    assert [argv[2] for _, argv in fake_hosts[-1].ran] == [leases.CHECK]      # nothing but the check ran
    said: list[str] = []
    report = ops.down(inv, break_lock=True, notice=said.append)
    assert said and said[0].startswith("h0: break the live lease of op-bbbb@ctl pid 4242 (gpucluster up)")
    assert not lease_path.exists()


def test_model_pull_and_check_network_take_the_lease(tmp_path, fake_hosts):
    from cluster import netcheck
    inv, prof = _inv(tmp_path)
    _, report = ops.model_pull(inv, prof)
    assert report.outcomes[0].step.id == "h0/lock" and report.outcomes[0].status == "ran"
    assert report.outcomes[-1].step.id == "h0/unlock"
    result = netcheck.check_network(inv, prof)
    ids = [o.step.id for o in result.report.outcomes]
    assert ids[0] == "h0/lock" and ids[-1] == "h0/unlock"
    assert "h0/lock" not in [s.id for s in result.steps]          # its plan: the check's own steps (no token in it)
    other = _lease(tmp_path, "bbbb0002", command="up")
    assert sh(other.take_argv()).returncode == 0
    for run in (lambda: ops.model_pull(inv, prof), lambda: netcheck.check_network(inv, prof)):
        with pytest.raises(LockHeld):
            run()
    dry = netcheck.check_network(inv, prof, dry_run=True)
    assert dry.report.outcomes[0].status == "would-fail" and fields(other)["token"] == "bbbb0002"
