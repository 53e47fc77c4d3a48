"""workbench/core/malloc.py: an entry point (``malloc.keep_freed_memory``, called by training, the evaluation and the command
line) makes glibc keep freed memory, so a large tensor allocated again is not
faulted back in page by page; WORKBENCH_MALLOC=system leaves glibc's default. Each case runs in a fresh process,
since the policy is set once per process."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the allocator policy is set on glibc only (Linux); elsewhere nothing changes")

PROBE = """
import json, resource, torch
from workbench.core import malloc
from workbench.modeling import runs
assert malloc.policy()["policy"] == "not set", "importing workbench sets nothing"
malloc.keep_freed_memory()                   # what train.train, evaluate.evaluate_runs and the command line do first
block = 64 * 2**20 // 4                      # a 64 MiB float32 tensor, far above glibc's default mmap threshold
x = torch.ones(block); del x                 # the first time, its pages are faulted in under any policy
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(block); del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"policy": malloc.policy(), "env": runs.environment()["malloc"], "faults": faults}))
"""


def probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_MALLOC"}
    if setting:
        env["WORKBENCH_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_freed_memory_is_reused_not_faulted_back_in():
    kept, system = probe(None), probe("system")
    assert kept["policy"]["policy"] == "keep freed memory"
    assert kept["policy"]["mmap_threshold"] == kept["policy"]["trim_threshold"] == 2**31 - 1
    assert system["policy"]["policy"] == "system (WORKBENCH_MALLOC=system)"
    # env.json records what was in effect
    assert kept["env"] == kept["policy"] and system["env"] == system["policy"]
    # glibc's default maps each 64 MiB tensor afresh: 16,384 pages of 4 KiB faulted in per allocation
    pages = 10 * 64 * 2**20 // 4096
    assert system["faults"] > pages // 2, system
    # kept: a few blocks more while the heap settles (measured: one to three of the ten, depending on what else the
    # process allocated in between), never one per allocation
    assert kept["faults"] < pages // 2 and kept["faults"] < system["faults"] // 2, (kept, system)
