"""The default worker count: CPUs allowed by affinity and cgroup quota (fake cgroup files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cpus import available_cpus, cgroup_cpu_limit
from engine.settings import Settings, load_settings


class FakeHost:
    """A /proc/self/cgroup and a /sys/fs/cgroup tree in a temp dir."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc-self-cgroup"
        self.fs = root / "sys-fs-cgroup"
        self.fs.mkdir()

    def membership(self, *lines: str) -> None:
        self.proc.write_text("".join(line + "\n" for line in lines))

    def write(self, relative: str, name: str, content: str) -> None:
        directory = self.fs / relative
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(content + "\n")

    def cpus(self, affinity: int) -> int:
        return available_cpus(
            proc_self_cgroup=self.proc, cgroup_fs=self.fs, affinity=lambda: affinity
        )


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_a_cgroup_v2_quota_caps_the_count_rounded_up(host: FakeHost) -> None:
    host.membership("0::/kubepods/pod1/ctr")
    host.write("kubepods/pod1/ctr", "cpu.max", "150000 100000")
    assert host.cpus(affinity=16) == 2
    assert cgroup_cpu_limit(proc_self_cgroup=host.proc, cgroup_fs=host.fs) == 1.5


def test_without_a_quota_the_affinity_mask_decides(host: FakeHost) -> None:
    host.membership("0::/user.slice")
    host.write("user.slice", "cpu.max", "max 100000")
    assert host.cpus(affinity=3) == 3


def test_a_parent_cgroup_with_a_tighter_quota_wins(host: FakeHost) -> None:
    host.membership("0::/kubepods/pod1/ctr")
    host.write("kubepods/pod1/ctr", "cpu.max", "400000 100000")
    host.write("kubepods/pod1", "cpu.max", "50000 100000")
    assert host.cpus(affinity=8) == 1


def test_an_affinity_mask_smaller_than_the_quota_wins(host: FakeHost) -> None:
    host.membership("0::/")
    host.write("", "cpu.max", "800000 100000")
    assert host.cpus(affinity=2) == 2


def test_a_container_without_a_cgroup_namespace_reads_its_own_mount(host: FakeHost) -> None:
    # /proc/self/cgroup names the host's path; the container sees its own cgroup at the mount.
    host.membership("0::/system.slice/docker-abc.scope")
    host.write("", "cpu.max", "200000 100000")
    assert host.cpus(affinity=32) == 2


def test_a_cgroup_v1_cfs_quota_caps_the_count(host: FakeHost) -> None:
    host.membership("12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc")
    host.write("cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "250000")
    host.write("cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000")
    assert host.cpus(affinity=64) == 3


def test_a_cgroup_v1_quota_of_minus_one_is_no_limit(host: FakeHost) -> None:
    host.membership("4:cpu,cpuacct:/")
    host.write("cpu,cpuacct", "cpu.cfs_quota_us", "-1")
    host.write("cpu,cpuacct", "cpu.cfs_period_us", "100000")
    assert host.cpus(affinity=4) == 4


def test_a_quota_under_one_cpu_still_gives_one_worker(host: FakeHost) -> None:
    host.membership("0::/")
    host.write("", "cpu.max", "20000 100000")
    assert host.cpus(affinity=4) == 1


@pytest.mark.parametrize("content", ["", "garbage", "100000", "-5 100000", "100000 0"])
def test_malformed_or_missing_cgroup_files_count_as_no_limit(host: FakeHost, content: str) -> None:
    host.membership("0::/x")
    host.write("x", "cpu.max", content)
    assert host.cpus(affinity=5) == 5


def test_no_cgroup_information_at_all_leaves_the_affinity(tmp_path: Path) -> None:
    assert (
        available_cpus(
            proc_self_cgroup=tmp_path / "missing",
            cgroup_fs=tmp_path / "missing-fs",
            affinity=lambda: 6,
        )
        == 6
    )


def test_on_this_machine_the_count_is_at_most_the_cpus_we_may_run_on() -> None:
    count = available_cpus()
    assert 1 <= count <= len(os.sched_getaffinity(0)) <= (os.cpu_count() or count)


def test_prefetch_worker_count_defaults_to_the_available_cpus() -> None:
    assert Settings().worker_count == available_cpus()
    assert load_settings({}).worker_count == available_cpus()
    assert load_settings({"PREFETCH_WORKER_COUNT": "7"}).worker_count == 7
