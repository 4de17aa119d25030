"""tools/slurm_train.sh against stand-ins for srun and scontrol: the
arguments it passes, the warning ahead of the time limit, and the requeue
of a preempted job (exit status 75)."""
import os
import os.path as osp
import subprocess

import pytest
from helpers import ROOT

SCRIPT = osp.join(ROOT, 'tools', 'slurm_train.sh')


def fake_slurm(folder, srun_status, mark=False):
    """srun and scontrol that write their arguments to files; with
    ``mark`` srun's task creates the preemption marker as train.py does."""
    for name, status in (('srun', srun_status), ('scontrol', 0)):
        path = osp.join(folder, name)
        marker = 'touch "$MMPFC_PREEMPTED_FILE"\n' if mark and \
            name == 'srun' else ''
        with open(path, 'w') as f:
            f.write(f'#!/bin/sh\necho "$@" > "{folder}/{name}.args"\n'
                    f'{marker}exit {status}\n')
        os.chmod(path, 0o755)


def run(tmp_path, srun_status, mark=False, **env):
    fake_slurm(str(tmp_path), srun_status, mark)
    base = {k: v for k, v in os.environ.items() if k != 'SLURM_JOB_ID'}
    env = dict(base, PATH=f"{tmp_path}:{os.environ['PATH']}", **env)
    proc = subprocess.run(['bash', SCRIPT, 'gpu', 'job', 'cfg.py',
                           '--resume'], env=env, capture_output=True,
                          text=True, timeout=30, cwd=str(tmp_path))
    with open(tmp_path / 'srun.args') as f:
        srun_args = f.read().split()
    requeued = (tmp_path / 'scontrol.args').read_text().split() \
        if (tmp_path / 'scontrol.args').exists() else None
    return proc, srun_args, requeued


def test_preempted_job_is_requeued(tmp_path):
    proc, srun_args, requeued = run(tmp_path, 75, SIGNAL_AHEAD='120',
                                    REQUEUE='1', SLURM_JOB_ID='4242')
    assert proc.returncode == 75
    assert '--signal=USR1@120' in srun_args
    assert srun_args[-4:] == ['cfg.py', '--launcher', 'slurm', '--resume']
    assert requeued == ['requeue', '4242']
    assert 'preempted' in proc.stderr


@pytest.mark.parametrize('status,env', [
    (0, dict(REQUEUE='1', SLURM_JOB_ID='4242')),   # finished: no requeue
    (1, dict(REQUEUE='1', SLURM_JOB_ID='4242')),   # failed: no requeue
    (75, dict()),                                  # not asked to requeue
])
def test_no_requeue_otherwise(tmp_path, status, env):
    proc, srun_args, requeued = run(tmp_path, status, **env)
    assert proc.returncode == status
    assert requeued is None
    assert not any(a.startswith('--signal') for a in srun_args)


def test_preempted_job_is_requeued_when_srun_reports_a_kill(tmp_path):
    """--kill-on-bad-exit: the first rank to exit with 75 gets the others
    killed, and srun reports that (137); the ranks' marker says preempted."""
    proc, _, requeued = run(tmp_path, 137, mark=True, REQUEUE='1',
                            SLURM_JOB_ID='4242')
    assert proc.returncode == 75
    assert requeued == ['requeue', '4242']
    assert not list(tmp_path.glob('.mmpfc-preempted.*'))  # cleaned up
