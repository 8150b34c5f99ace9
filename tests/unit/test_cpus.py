"""Thread counts from the CPUs a process may use: affinity, cgroup quotas (v1 and v2), processes sharing a host."""

import pathlib

from services.cpus import PROCESSES_ENV, cgroup_cpus, plan_threads, set_passive_openmp


def write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_smallest_quota_on_the_path(tmp_path):
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "kubepods" / "cpu.max", "400000 100000\n")
    write(tmp_path / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    write(tmp_path / "kubepods" / "pod1" / "c1" / "cpu.max", "max 100000\n")
    assert cgroup_cpus(tmp_path, "0::/kubepods/pod1/c1\n") == 1.5
    assert cgroup_cpus(tmp_path, "0::/kubepods\n") == 4.0
    assert cgroup_cpus(tmp_path, "0::/\n") is None


def test_cgroup_v1_reads_cfs_quota_and_period(tmp_path):
    write(tmp_path / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    assert cgroup_cpus(tmp_path, proc) == 2.5
    assert cgroup_cpus(tmp_path, "12:cpu,cpuacct:/\n") is None


def test_threads_are_the_share_of_the_smaller_of_affinity_and_quota():
    plan = plan_threads(None, environ={}, quota=3.0, affinity=64)
    assert (plan.intra_op, plan.inter_op, plan.source) == (3, 1, "cgroup CPU quota")
    plan = plan_threads(None, environ={}, quota=None, affinity=8)
    assert (plan.intra_op, plan.source) == (8, "affinity mask")
    plan = plan_threads(None, environ={PROCESSES_ENV: "4"}, quota=None, affinity=8)
    assert plan.intra_op == 2 and plan.processes == 4
    assert plan_threads(None, environ={PROCESSES_ENV: "5"}, quota=None, affinity=2).intra_op == 1  # at least one
    assert plan_threads(None, environ={}, quota=0.5, affinity=16).intra_op == 1
    assert plan_threads(6, environ={PROCESSES_ENV: "4"}, quota=1.0, affinity=2).intra_op == 6  # config wins
    assert plan_threads(None, environ={PROCESSES_ENV: "many"}, quota=None, affinity=4).intra_op == 4


def test_openmp_waits_passively_unless_the_user_chose():
    env = {}
    set_passive_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_passive_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
