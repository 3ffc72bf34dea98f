"""The process group under torchrun: leaving it really ends it.

torch.distributed.nn.functional and a few other modules bind ``group.WORLD`` as default arguments when first imported,
and the first optimizer step imports them (through torch._dynamo). When that happened after the group was made, the
group outlived ``destroy_process_group()``; its gloo threads then freed tensors while the interpreter shut down, and the
process aborted ("terminate called without an active exception") in about one exit in ten. The check here does not
depend on that timing: after ``shutdown`` the gloo threads must be gone, every time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import os
import time
import torch
from torch import nn
from cycle_encoding import distributed as dd

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
info = dd.init_distributed(torch.device("cpu"))
assert info.world_size == 2
net = nn.Linear(3, 2)
opt = torch.optim.Adam(net.parameters())
net(torch.ones(1, 3)).sum().backward()
dd.average_gradients(net.parameters(), info)
opt.step()  # the first step imports torch._dynamo and, through it, torch.distributed.nn
dd.broadcast_module(net, info)
dd.gather_objects({"rank": info.rank}, info)
during = threads()
dd.shutdown(info)
# a thread told to end leaves /proc/self/task when it has exited, a moment after the join returns on a loaded machine:
# wait for that (a group that outlives shutdown keeps its threads for good, and still fails here)
deadline = time.monotonic() + 60
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.05)
os.write(1, f"rank {info.rank}: threads before {before} during {during} after {threads()}\\n".encode())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_shutdown_ends_the_gloo_threads(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "script.py"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=tmp_path)  # catches a hang only
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"rank (\d): threads before (\d+) during (\d+) after (\d+)", r.stdout)
    assert sorted(rank for rank, *_ in found) == ["0", "1"], r.stdout
    for rank, before, during, after in found:
        assert int(during) > int(before), (rank, r.stdout)  # the group did start its threads
        assert int(after) == int(before), (rank, r.stdout)  # ... and leaving it joined them
