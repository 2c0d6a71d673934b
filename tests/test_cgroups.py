"""Per-job cgroups: the kernel's own files where this machine has them (cgroup v1 memory
and pids as root, the hybrid cgroup2 mount for joining and cgroup.kill), and a fake tree
for the cgroup v2 delegation steps no test machine here offers (controllers in v2)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from matrixjobs.config import LimitsConfig
from matrixjobs.queue import cgroups
from matrixjobs.queue.cgroups import Cgroups, JobCgroup, detect, own_cgroups

HYBRID_V2 = Path("/sys/fs/cgroup/unified")
MIB = 1024**2


def test_proc_self_cgroup_is_read_per_controller_and_v2():
    text = ("12:pids:/user.slice\n4:memory:/process_api/abc\n1:name=systemd:/\n"
            "3:cpu,cpuacct:/x\n0::/system.slice/matrixjobs.service\n")
    assert own_cgroups(text) == {"pids": "/user.slice", "memory": "/process_api/abc",
                                 "systemd": "/", "cpu": "/x", "cpuacct": "/x",
                                 "": "/system.slice/matrixjobs.service"}


@pytest.mark.parametrize(("version", "files", "hit"), [
    (2, {"memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"}, "memory"),
    (2, {"memory.events": "max 4\noom 0\noom_kill 0\n", "pids.events": "max 17\n"},
     "processes"),
    (2, {"memory.events": "oom_kill 0\n", "pids.events": "max 0\n"}, None),
    (1, {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"}, "memory"),
    (1, {"pids.events": "max 3\n"}, "processes"),
])
def test_the_kernels_counters_say_which_limit_was_hit(tmp_path, version, files, hit):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    group = JobCgroup(version, {"memory": tmp_path, "pids": tmp_path})
    assert group.hit() == hit


def test_a_v2_job_cgroup_gets_its_limits_and_a_v1_one_per_controller(tmp_path):
    v2 = Cgroups(2, {"": tmp_path / "v2"}, {"memory", "pids"})
    (tmp_path / "v2").mkdir()
    group = v2.create("j7", LimitsConfig(memory=256 * MIB, processes=64))
    assert group is not None
    directory = group.dirs[""]
    assert directory.name.startswith(f"matrixjobs-{os.getpid()}-j7-")
    assert (directory / "memory.max").read_text() == str(256 * MIB)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "64"

    bases = {"memory": tmp_path / "memory", "pids": tmp_path / "pids"}
    for base in bases.values():
        base.mkdir()
    v1 = Cgroups(1, bases, {"memory", "pids"})
    group = v1.create("j8", LimitsConfig(memory=MIB))
    assert group is not None
    assert (group.dirs["memory"] / "memory.limit_in_bytes").read_text() == str(MIB)
    assert not (group.dirs["pids"] / "pids.max").exists()  # no process limit asked for


def test_a_delegated_v2_cgroup_with_processes_moves_the_service_into_a_leaf_first(
        tmp_path, monkeypatch):
    """cgroup v2 lets a cgroup pass controllers on only while it holds no process: the
    service moves itself into `service/`, then enables memory and pids for job cgroups."""
    mount = tmp_path / "cgroup"
    base = mount / "system.slice" / "matrixjobs.service"
    base.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("cpu memory pids io\n")
    (base / "cgroup.controllers").write_text("cpu memory pids\n")
    (base / "cgroup.subtree_control").write_text("\n")
    (base / "cgroup.procs").write_text(f"{os.getpid()}\n")
    written: list[tuple[str, str]] = []

    def kernel_write(path: Path, value: str) -> bool:  # what the kernel shows afterwards
        written.append((str(path.relative_to(mount)), value))
        path.write_text(value.replace("+", "") if path.name == "cgroup.subtree_control"
                        else value)
        return True

    monkeypatch.setattr(cgroups, "V2_CANDIDATES", (mount,))
    monkeypatch.setattr(cgroups, "_write", kernel_write)
    found = detect("0::/system.slice/matrixjobs.service\n")
    assert found is not None and (found.version, found.controllers) == (2, {"memory", "pids"})
    assert written == [
        ("system.slice/matrixjobs.service/service/cgroup.procs", str(os.getpid())),
        ("system.slice/matrixjobs.service/cgroup.subtree_control", "+memory +pids"),
    ]


def test_doctor_looks_without_moving_the_service(tmp_path, monkeypatch):
    mount = tmp_path / "cgroup"
    base = mount / "app.slice"
    base.mkdir(parents=True)
    (mount / "cgroup.controllers").write_text("memory pids\n")
    (base / "cgroup.controllers").write_text("memory pids\n")
    monkeypatch.setattr(cgroups, "V2_CANDIDATES", (mount,))
    found = detect("0::/app.slice\n", enable=False)
    assert found is not None and found.controllers == {"memory", "pids"}
    assert not (base / "service").exists()


def test_cgroups_of_dead_services_are_swept_and_live_ones_kept(tmp_path):
    base = tmp_path / "pids"
    dead = base / "matrixjobs-999999999-j1-1"
    live = base / f"matrixjobs-{os.getpid()}-j2-1"
    other = base / "someone-else"
    for directory in (dead, live, other):
        directory.mkdir(parents=True)
    Cgroups(1, {"pids": base}, {"pids"}).sweep()
    assert (dead.exists(), live.exists(), other.exists()) == (False, True, True)


@pytest.mark.skipif(os.geteuid() != 0 or not (HYBRID_V2 / "cgroup.controllers").exists(),
                    reason="needs root and the hybrid layout's cgroup2 mount")
def test_a_real_v2_job_cgroup_is_joined_before_exec_and_killed_whole():
    """On the kernel: the child joins before it runs anything, everything it starts is in
    the cgroup, and cgroup.kill ends them all at once."""
    tree = Cgroups(2, {"": HYBRID_V2}, set())
    group = tree.create("jtest", LimitsConfig())
    assert group is not None
    marker = f"3600.{os.getpid()}"
    try:
        process = subprocess.Popen(
            group.joining(["sh", "-c", f"setsid sleep {marker} & sleep {marker}"]),
            start_new_session=True)
        procs = group.dirs[""] / "cgroup.procs"
        deadline = time.monotonic() + 5
        while len(procs.read_text().split()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(procs.read_text().split()) == 3  # sh and both sleeps
        group.kill()
        assert process.wait(5) == -9
        deadline = time.monotonic() + 5
        while procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procs.read_text().strip() == ""
    finally:
        group.kill()
        deadline = time.monotonic() + 5
        while not group.remove() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not group.dirs[""].exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup v1 here is writable by root only")
def test_on_this_machine_as_root_jobs_get_v1_memory_and_pids():
    found = detect(enable=False)
    assert found is not None and found.controllers == {"memory", "pids"}
