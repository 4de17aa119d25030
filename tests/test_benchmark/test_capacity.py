"""The predicted GPU memory table (mmpfc.benchmark.capacity, gpu_memory).

The expected peaks are written out from byte counts here: fp32 centers and
momentum of the shard, the sampled rows' logits and gradients, the
gathered embeddings, the backbone's parameters, DDP buckets and momentum,
the activations, the input batch; then the allocator's 10 % and the four
fixed allowances a GPU process holds (512 + 32 + 256 + 192 MiB).
"""
import re

import pytest
from helpers import load_tool

from mmpfc.benchmark import capacity
from mmpfc.benchmark.gpu_memory import Activations, ModelFigures
from mmpfc.benchmark.memory_model import largest_fitting

MiB = 2**20
P, L = 40_000_000, 10_000_000  # backbone parameters, the largest one
FIGURES = ModelFigures(params=P, largest_param=L,
                       activations=Activations(per_sample=30 * MiB,
                                               fixed=50 * MiB))
ALLOWANCES = (512 + 32 + 256 + 192) * MiB


def expected_pfc01_125k() -> int:
    """PFC0.1 at 125,000 identities on 8 GPUs, 128 images each, D = 512."""
    cl, s, n, d = 15_625, 1_562, 1024, 512  # shard, sampled, global batch
    head = (2 * cl * d * 4  # centers and momentum
            + s * n * 4  # the sampled logits, gradients in place
            + 4 * n * d * 4  # gathered embeddings and their gradients
            + cl * 4 + 12 * s)  # sampling: the shard's mask, the indices
    # at the backward's start: parameters, DDP buckets, momentum and the
    # first (largest) gradient; 128 images' activations and inputs
    backbone = 3 * P * 4 + L * 4
    activations = 128 * 30 * MiB + 50 * MiB
    inputs = 128 * 3 * 112 * 112 * 4
    tensors = head + backbone + activations + inputs
    return tensors + int(0.1 * tensors) + ALLOWANCES


def test_predicted_peak_written_out():
    got = capacity.predicted_peak('PFC0.1', 125_000, FIGURES)
    assert got.peak == pytest.approx(expected_pfc01_125k(), abs=4)
    assert got.parts['cuda_context'] == 512 * MiB
    assert got.parts['nccl_buffers'] == 192 * MiB


def test_memory_table_has_every_reference_cell_and_its_ratio():
    table = capacity.memory_table(FIGURES)
    rows = [line for line in table.splitlines()
            if re.match(r'\| [\d,]+ \|', line)]
    assert [int(r.split('|')[1].replace(',', '')) for r in rows] == [
        125_000, 250_000, 500_000, 1_000_000, 1_400_000, 2_000_000,
        4_000_000, 5_500_000, 8_000_000, 16_000_000, 29_000_000]
    mb = expected_pfc01_125k() / MiB
    assert rows[0].endswith(f'| 4868 / {mb:.0f} ({mb / 4868:.2f}) |')
    assert '| - / ' in rows[-1] and '| 32324 / ' in rows[-1]
    assert '| PFC0.1 | 10328-10488 |' in table


def test_largest_fit_is_the_edge():
    got = capacity.largest_fit('PFC0.1 bf16/int8', 32, FIGURES)
    budget = 32 * 2**30
    assert capacity.predicted_peak('PFC0.1 bf16/int8', got,
                                   FIGURES).peak <= budget
    assert capacity.predicted_peak('PFC0.1 bf16/int8', got + 8,
                                   FIGURES).peak > budget
    order = [capacity.largest_fit(label, 32, FIGURES) for label in
             ('DP', 'MP', 'PFC0.1', 'PFC0.1 bf16/bf16', 'PFC0.1 bf16/int8')]
    assert order == sorted(order)


@pytest.mark.parametrize('edge', [0, 1, 7, 1000, 2**33 + 5])
def test_largest_fitting(edge):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= edge

    assert largest_fitting(fits) == edge
    assert len(calls) < 2 * 40 + 2  # doubling and bisection


def test_memory_table_command(capsys):
    tool = load_tool('benchmark.py')
    assert tool.main(['--memory-table']) == 0
    out = capsys.readouterr().out
    assert out.startswith('| identities | DP: reference / mmpfc (ratio) |')
    assert out.count('| 29,000,000 |') == 1
    assert 'Parts of mmpfc PFC0.1 at 125,000 identities (MB): activations' \
        in out
    assert 'largest C on 8 x 80 GB' in out
