"""The roofline step-time estimate (mmpfc.benchmark.step_time), with the
V100's datasheet figures written out: 125 TFLOP/s fp16 tensor cores,
15.7 TFLOP/s fp32, 900 GB/s; 60 % of peak arithmetic, 75 % of peak
bandwidth; NCCL at 130 GB/s bus bandwidth."""
import pytest
import torch

from mmpfc.benchmark.step_time import (collective_seconds, gpu_by_name,
                                       op_seconds)
from mmpfc.testing import Work

V100 = gpu_by_name('v100')


def work(op, dtype, flops, nbytes):
    return Work('forward', op, dtype, flops, nbytes, '')


def test_products_are_bound_by_arithmetic_or_bytes():
    # 2 TFLOP in fp16 and 1 GB: arithmetic-bound
    assert op_seconds(work('mm', torch.float16, 2e12, 1e9), V100) == \
        pytest.approx(2e12 / (125e12 * 0.6))
    # the same in fp32: 8 x slower
    assert op_seconds(work('mm', torch.float32, 2e12, 1e9), V100) == \
        pytest.approx(2e12 / (15.7e12 * 0.6))
    # an elementwise op over 3 GB: bandwidth-bound
    assert op_seconds(work('mul', torch.float32, 0, 3e9), V100) == \
        pytest.approx(3e9 / (900e9 * 0.75))
    assert op_seconds(work('empty', torch.float32, 0, 3e9), V100) == 0


def test_fp32_convolutions_use_tf32_on_ampere():
    a100 = gpu_by_name('A100')
    conv = work('convolution', torch.float32, 1e12, 0)
    assert op_seconds(conv, a100) == pytest.approx(1e12 / (156e12 * 0.6))
    mm = work('mm', torch.float32, 1e12, 0)
    assert op_seconds(mm, a100) == pytest.approx(1e12 / (19.5e12 * 0.6))


def test_ring_collectives():
    # an all-reduce of 1 GB on 8 GPUs moves 2 x 7/8 GB per GPU
    assert collective_seconds('all_reduce', 10**9, 8, V100) == \
        pytest.approx(20e-6 + 1.75e9 / (130e9 * 0.75))
    # an all-gather of 1 MB per rank moves 7 MB into each GPU
    assert collective_seconds('all_gather', 10**6, 8, V100) == \
        pytest.approx(20e-6 + 7e6 / (130e9 * 0.75))
    assert collective_seconds('all_reduce', 10**9, 1, V100) == 0


def test_unknown_gpu():
    with pytest.raises(ValueError, match="unknown GPU 'K80'.*V100, A100, "
                       'H100'):
        gpu_by_name('K80')


def test_gpu_from_a_device_name():
    # as torch.cuda.get_device_name() names them
    assert gpu_by_name('NVIDIA H100 80GB HBM3').fp16 == 989e12
    assert gpu_by_name('Tesla V100-SXM2-32GB').bandwidth == 900e9
    assert gpu_by_name('NVIDIA H200').bandwidth == 4.8e12
