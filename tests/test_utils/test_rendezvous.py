"""Start-up of the process group outside torchrun: a missing rank fails
within ``start_timeout`` with a message, instead of hanging 30 minutes."""
import subprocess
import sys
import time

from dist_utils import free_port

SCRIPT = """
import os, sys, time
from mmpfc.utils.compat import init_process_group_for_device
os.environ.update(RANK=sys.argv[1], WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                  MASTER_PORT=sys.argv[2])
init_process_group_for_device('pytorch', backend='gloo', start_timeout=2)
"""


def test_a_rank_alone_gives_up_with_a_message():
    """Rank 0 alone and rank 1 alone (each on its own port), side by side."""
    start = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, '-c', SCRIPT, str(rank), str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.perf_counter() - start < 60
    for rank, (proc, (_, stderr)) in enumerate(zip(procs, outs)):
        assert proc.returncode != 0
        assert (f'rank {rank} of WORLD_SIZE=2: not every rank joined at '
                'MASTER_ADDR=127.0.0.1') in stderr
        assert 'start_timeout=2 s' in stderr
        assert 'tools/dist_train.sh' in stderr


def test_two_ranks_meet():
    port = str(free_port())
    ok = SCRIPT + ('import torch.distributed as dist\n'
                   'print(dist.get_rank(), dist.get_world_size())\n'
                   'dist.barrier()\n')
    procs = [subprocess.Popen([sys.executable, '-c', ok, str(r), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(o.strip() for o, _ in outs) == ['0 2', '1 2']
