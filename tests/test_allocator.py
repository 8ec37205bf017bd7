"""glibc's allocator kept from returning and re-faulting a training step's memory (sciml/allocator.py)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from sciml.allocator import keep_freed_memory
from sciml.errors import SciMLError

# 40 MB blocks allocated, written and freed in turn, as a training step's activations are: above glibc's largest
# dynamic mmap threshold (32 MB), so by default each one is mapped afresh and every page faults in again.
STEPS = """
import json, resource, sys
import numpy as np
from sciml.allocator import keep_freed_memory
keep = json.loads(sys.argv[1])
if keep is not None:
    keep_freed_memory(keep)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(10 * 2**20, np.float32)
    b = np.ones(10 * 2**20, np.float32)
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_step(keep):
    out = subprocess.run([sys.executable, "-c", STEPS, json.dumps(keep)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = faults_per_step(None), faults_per_step(256)
    # glibc's defaults: every step faults its 80 MB in again (at least 40 faults even in 2 MB transparent huge
    # pages; 1,064 per step here); kept: the first step faults the memory in, the later ones reuse it
    assert min(default[1:]) >= 40, default
    assert max(kept[1:]) <= 8, kept


def test_bad_values_are_named():
    assert keep_freed_memory(None) is False
    for bad in (0, -5, "lots", True, 1.5):
        with pytest.raises(SciMLError, match=rf"malloc_keep_mb: '{bad}' is not a positive number of megabytes"):
            keep_freed_memory(bad)
