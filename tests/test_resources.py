"""The CPUs and memory a process may use, read from fake cgroup v1/v2 trees and /proc files; threads from them."""
import logging
from pathlib import Path

import pytest
import torch

from sciml import resources, threads
from sciml.errors import SciMLError

GiB = 2**30


def tree(tmp_path: Path, files: dict[str, str], cgroup: str, meminfo_gib: float = 64) -> tuple[Path, Path]:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {int(meminfo_gib * 2**20)} kB\n")
    return root, proc


def test_v1_memory_limit_of_own_cgroup_and_its_usage(tmp_path):
    root, proc = tree(tmp_path, {
        "memory/memory.limit_in_bytes": "9223372036854771712",  # the unlimited root
        "memory/jobs/memory.limit_in_bytes": str(6 * GiB),      # a parent's limit applies too
        "memory/jobs/job1/memory.limit_in_bytes": str(8 * GiB),
        "memory/jobs/job1/memory.usage_in_bytes": str(2 * GiB),
    }, "4:memory:/jobs/job1\n3:cpu,cpuacct:/jobs/job1\n")
    assert resources.cgroup_memory_limit(root, proc) == 6 * GiB
    memory = resources.usable_memory(ranks=2, root=root, proc=proc)
    assert memory.bytes == 2 * GiB, "(6 GiB limit - 2 GiB used) shared by 2 local ranks"
    assert "cgroup limit 6.00 GiB" in memory.describe() and "2 local rank" in memory.describe()


def test_page_cache_charged_to_the_cgroup_is_not_used_memory(tmp_path):
    """Reading the data fills the page cache, which the kernel charges to the cgroup up to its limit but reclaims;
    counted as used, a 1.25 GiB cap left a 0.02 GiB budget after the files of a climate data set were opened.
    Shared memory (DataLoader batches) is not reclaimable and still counts."""
    stat = "\n".join([f"total_cache {int(1.5 * GiB)}", f"total_shmem {GiB // 2}", f"total_active_file {GiB // 4}",
                      f"total_inactive_file {GiB * 3 // 4}", f"total_rss {GiB // 4}"])
    root, proc = tree(tmp_path, {"memory/job/memory.limit_in_bytes": str(2 * GiB),
                                 "memory/job/memory.usage_in_bytes": str(int(1.75 * GiB)),
                                 "memory/job/memory.stat": stat}, "4:memory:/job\n")
    assert resources.cgroup_memory_usage(root, proc) == int(0.75 * GiB)  # rss + shmem
    assert resources.usable_memory(1, root, proc).bytes == int(1.25 * GiB)
    root, proc = tree(tmp_path / "v2", {"job/memory.max": str(2 * GiB), "job/memory.current": str(GiB),
                                        "job/memory.stat": f"anon {GiB // 4}\nfile {GiB * 3 // 4}\n"
                                                           f"active_file {GiB // 4}\ninactive_file {GiB // 2}"},
                      "0::/job\n")
    assert resources.cgroup_memory_usage(root, proc) == GiB // 4


def test_v2_memory_max_and_mem_available(tmp_path):
    root, proc = tree(tmp_path, {"memory.max": "max", "job/memory.max": str(32 * GiB),
                                 "job/memory.current": str(1 * GiB)}, "0::/job\n", meminfo_gib=4)
    assert resources.cgroup_memory_limit(root, proc) == 32 * GiB
    assert resources.usable_memory(1, root, proc).bytes == 4 * GiB, "MemAvailable is smaller than the cgroup"


def test_no_cgroup_limit(tmp_path):
    root, proc = tree(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712", "memory.max": "max"},
                      "4:memory:/\n0::/\n", meminfo_gib=3)
    assert resources.cgroup_memory_limit(root, proc) is None
    assert resources.usable_memory(3, root, proc).bytes == GiB


def test_cpu_quota_v1_and_v2(tmp_path):
    root, proc = tree(tmp_path, {"cpu,cpuacct/job/cpu.cfs_quota_us": "150000",
                                 "cpu,cpuacct/job/cpu.cfs_period_us": "100000"}, "3:cpu,cpuacct:/job\n")
    assert resources.cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    root, proc = tree(tmp_path / "v2", {"cpu.max": "max 100000", "job/cpu.max": "400000 100000"}, "0::/job\n")
    assert resources.cgroup_cpu_quota(root, proc) == pytest.approx(4)
    root, proc = tree(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
                      "1:cpu:/\n")
    assert resources.cgroup_cpu_quota(root, proc) is None


def test_usable_cpus_takes_the_smallest_limit(tmp_path, monkeypatch):
    root, proc = tree(tmp_path, {"cpu.max": "250000 100000"}, "0::/\n")
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    cpus = resources.usable_cpus(root, proc)
    assert cpus.count == 2 and cpus.limits == {"affinity": 16, "SLURM_CPUS_PER_TASK": 8, "cgroup quota": 2.5}


def test_local_ranks(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert resources.local_ranks(4) == (4, "trainer.devices")
    assert resources.local_ranks([0, 1]) == (2, "trainer.devices")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    assert resources.local_ranks(4) == (3, "SLURM_NTASKS_PER_NODE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resources.local_ranks("auto") == (2, "LOCAL_WORLD_SIZE")


def test_busy_cpus_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    samples = iter([("100 0 0 900 0", "0 0 0 1000 0"), ("600 0 0 1400 0", "100 0 0 1900 0")])

    class FakeProc:  # /proc/stat changes between the two reads
        def __truediv__(self, name):
            cpu0, cpu1 = next(samples)
            stat.write_text(f"cpu  1 2 3 4\ncpu0 {cpu0} 0 0 0\ncpu1 {cpu1} 0 0 0\n")
            return stat

    busy = threads.busy_cpus({0, 1}, interval=0, proc=FakeProc())
    assert busy == pytest.approx(0.5 + 0.1)


def test_auto_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: resources.CPUs(8, {"affinity": 8}))
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.2)
    assert threads.auto_threads(devices=1)[0] == 8
    assert threads.auto_threads(devices=2)[0] == 4, "two ranks share the node"
    monkeypatch.setattr(threads, "busy_cpus", lambda: 5.6)
    number, reason = threads.auto_threads(devices=1)
    assert number == 2 and "5.6 of them busy" in reason
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.auto_threads(devices=1) == (3, "OMP_NUM_THREADS=3")


def test_configure_threads(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="sciml"):
            assert threads.configure_threads(1) == 1
        assert torch.get_num_threads() == 1 and "threads: 1 intra-op" in caplog.text
        assert threads.configure_threads(None) == 1, "null leaves torch's setting alone"
        with pytest.raises(SciMLError, match="threads: 'many'"):
            threads.configure_threads("many")
    finally:
        torch.set_num_threads(before)
