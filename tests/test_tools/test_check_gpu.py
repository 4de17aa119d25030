"""``tools/check_gpu.sh --cpu`` runs: the GPU check cannot rot unnoticed."""
import os
import os.path as osp
import subprocess

from helpers import ROOT


def test_check_gpu_script_runs_on_the_cpu():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'check_gpu.sh'),
                           '--cpu'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert ' passed' in out and ' failed' not in out  # (a) the cuda tests
    assert 'Training: Speed ' in out and 'samples/sec' in out  # (b)
    assert 'Memory per rank after step 2' in out
    assert 'Memory per rank after step 4' in out
    assert '[0] ' in out and ' MB | peak ' in out
    # (b) and (c): the fit check's prediction beside each run's figures
    for config in ('r50_pfc0.1_3m.py', 'r50_mp_3m.py'):
        assert f'configs/pfc/{config}: measured / predicted' in out
    assert out.count('| tensors at the peak, MB') == 2
    assert 'fit check of' in out and 'failed (status' not in out
