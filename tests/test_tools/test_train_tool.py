"""tools/train.py options and a real ``tools/dist_train.sh`` run (torchrun,
2 CPU processes, gloo initialized by the runner)."""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
from dist_utils import free_port
from helpers import ROOT, load_tool
from messages import assert_mentions
from tiny_training import check_shard_dirs

DEMO = osp.join(ROOT, 'configs', 'pfc', 'mbf_pfc0.1_demo_cpu.py')


def load_train_tool():
    return load_tool('train.py')


@pytest.fixture(scope='module')
def train_tool():
    return load_train_tool()


def build_cfg(tool, *argv):
    return tool.build_cfg(tool.parse_args([DEMO, *argv]))


def test_defaults(train_tool):
    cfg = build_cfg(train_tool)
    assert cfg.launcher == 'none' and cfg.resume is False
    assert cfg.work_dir == './work_dirs/mbf_pfc0.1_demo_cpu'
    assert cfg.optim_wrapper.type == 'PartialFCOptimWrapper'


def test_amp_switches_to_the_shard_aware_amp_wrapper(train_tool):
    cfg = build_cfg(train_tool, '--amp', '--work-dir', '/tmp/x',
                    '--launcher', 'pytorch')
    assert cfg.optim_wrapper.type == 'PartialFCAmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.optim_wrapper.optimizer.lr == 0.1  # the rest is kept
    assert (cfg.work_dir, cfg.launcher) == ('/tmp/x', 'pytorch')
    with pytest.raises(ValueError, match="'Adam'"):
        build_cfg(train_tool, '--amp', '--cfg-options',
                  'optim_wrapper.type=Adam')


def test_resume_and_cfg_options(train_tool):
    cfg = build_cfg(train_tool, '--resume')
    assert cfg.resume == 'auto' and cfg.load_from is None
    # MMEngine's own runner takes a bool, and would resume load_from
    cfg = build_cfg(train_tool, '--resume', '--cfg-options',
                    'runner_type=Runner', 'load_from=pretrained.pth')
    assert cfg.resume is True and cfg.load_from is None
    cfg = build_cfg(train_tool, '--resume', 'w/iter_8.pth', '--cfg-options',
                    'train_dataloader.batch_size=4', 'train_cfg.max_iters=3')
    assert (cfg.resume, cfg.load_from) == (True, 'w/iter_8.pth')
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.train_cfg.max_iters == 3


def test_dist_train_sh_runs_two_cpu_processes(tmp_path):
    """The documented command, shortened by --cfg-options."""
    env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS='1')
    cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), DEMO, '2',
           '--amp', '--work-dir', str(tmp_path), '--cfg-options',
           'train_cfg.max_iters=4', 'train_dataloader.batch_size=2',
           'default_hooks.logger.interval=2',
           'default_hooks.checkpoint.interval=4', 'custom_hooks.1.interval=4',
           'log_level=INFO']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        with open(osp.join(str(tmp_path), 'failed_run.log'), 'w') as f:
            f.write(out)
        errors = [line for line in out.splitlines() if re.search(
            r'Error|error|terminate|what\(\)|Traceback|Signal', line)]
        raise AssertionError('\n'.join(errors[:40]) + '\n...\n' +
                             out[-3000:])
    lines = re.findall(r'Training: Speed [\d.]+ samples/sec   Loss ([\d.]+)'
                       r'   LearningRate [\d.]+   Epoch: 0   Global Step: '
                       r'(\d+)', out)
    assert [step for _, step in lines] == ['2', '4']  # rank 0 only
    assert len(re.findall(r'^\[[01]\] .* \| peak ', out, re.M)) == 4
    # the config dump and hook table: in the log file, not on the console
    assert 'Environment, config and hook order: see ' in out
    assert 'Hooks will be executed' not in out and '\nConfig:' not in out
    log_file, = glob.glob(osp.join(str(tmp_path), '*', '*.log'))
    with open(log_file) as f:
        logged = f.read()
    assert 'PartialFCAmpOptimWrapper' in logged
    assert 'Hooks will be executed in the following order' in logged
    folder, = check_shard_dirs(tmp_path, ['iter_4.pth'])
    assert sorted(os.listdir(tmp_path / folder)) == [
        'rank0-of2.pth', 'rank1-of2.pth']


def test_a_failing_rank_closes_the_torchrun_report(tmp_path):
    """``@record``: torchrun's closing report carries the failing rank's
    error (without it: ``error_file: <N/A>`` and no traceback there)."""
    env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS='1')
    cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), DEMO, '1',
           '--work-dir', str(tmp_path), '--cfg-options',
           'model.head.sample_rate=2.0']
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    report = out[out.rindex('Root Cause'):]
    assert 'error_file: <N/A>' not in report
    # the rank's own error: its type, the class, the argument and value
    assert_mentions(report, 'ValueError: PartialFCHead: sample_rate',
                    '[0, 1]', 'got 2.0')


def test_sigterm_to_the_whole_job_saves_and_resumes(tmp_path):
    """What Slurm does at preemption: SIGTERM to every process of the job
    (torchrun, both ranks, their loader workers). torchrun forwards it to
    the ranks once more; the ranks finish their iteration, save it
    together and exit with status 75; --resume continues from there."""
    import signal
    import time
    marker = tmp_path / 'preempted'  # what slurm_train.sh looks for
    env = dict(os.environ, PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS='1', MMPFC_PREEMPTED_FILE=str(marker))
    options = ['--work-dir', str(tmp_path), '--cfg-options',
               'train_cfg.max_iters=12', 'train_dataloader.batch_size=2',
               'train_dataloader.num_workers=1',
               'default_hooks.logger.interval=1',
               'default_hooks.checkpoint.interval=100', 'log_level=INFO']
    cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), DEMO, '2',
           *options]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out, deadline = [], time.monotonic() + 240
    try:
        for line in proc.stdout:
            out.append(line)
            if 'Global Step: 3' in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
            assert time.monotonic() < deadline, ''.join(out[-40:])
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = ''.join(out) + rest
    saved = re.findall(r'Preempted \(SIGTERM\): saved (\S+) at iteration '
                       r'(\d+)', text)
    assert saved, text[-3000:]
    path, stop = saved[0][0], int(saved[0][1])
    assert 3 <= stop < 12 and osp.basename(path) == f'iter_{stop}.pth'
    assert 'exited unexpectedly' not in text  # the loader workers lived
    assert re.search(r'exitcode\s*:\s*75', text) or \
        'train.py: preempted by SIGTERM' in text, text[-3000:]
    with open(osp.join(str(tmp_path), 'last_checkpoint')) as f:
        assert osp.basename(f.read().strip()) == f'iter_{stop}.pth'
    assert marker.is_file()

    env['PORT'] = str(free_port())
    proc = subprocess.run(cmd + ['--resume'], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    steps = [int(s) for s in re.findall(r'Global Step: (\d+)', text)]
    assert steps == list(range(stop + 1, 13)), steps
