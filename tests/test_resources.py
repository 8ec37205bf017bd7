"""The memory a process may use, read from cgroup files as HPC nodes and containers set them."""
from sciml.resources import cgroup_memory_limit, local_ranks, usable_memory_bytes


def _fake(tmp_path, membership: str, files: dict[str, str]):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(membership)
    return tmp_path, proc


def test_cgroup_v1_limit_of_this_process(tmp_path):
    root, proc = _fake(tmp_path, "4:memory:/job_17\n3:cpuset:/\n",
                       {"memory/job_17/memory.limit_in_bytes": str(1717986918)})
    assert cgroup_memory_limit(root, proc) == 1717986918


def test_cgroup_v2_limit_and_unlimited(tmp_path):
    root, proc = _fake(tmp_path, "0::/slurm/job_3\n", {"slurm/job_3/memory.max": "2147483648\n"})
    assert cgroup_memory_limit(root, proc) == 2**31
    root, proc = _fake(tmp_path / "b", "0::/x\n4:memory:/y\n",
                       {"x/memory.max": "max\n", "memory/y/memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_memory_limit(root, proc) is None


def test_memory_is_shared_among_the_ranks_of_a_node(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = usable_memory_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_ranks() == 4 and abs(usable_memory_bytes() - one / 4) < one * 0.05
