"""Virtual GPU ranks: fake CUDA tensors in a fake process group, with what a
GPU step does recorded, and nothing left behind."""
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from mmpfc.testing import virtual_rank
from mmpfc.utils.compat import all_gather_into, reduce_scatter_into


def test_collectives_are_recorded_with_kind_and_bytes():
    with virtual_rank(3, 8) as gpu:
        assert (dist.get_rank(), dist.get_world_size()) == (3, 8)
        x = torch.empty(16, 4, device='cuda', dtype=torch.float16)
        with gpu.phase('work'):
            dist.all_reduce(x)
            out = torch.empty(8 * 16, 4, device='cuda', dtype=torch.float16)
            all_gather_into(out, x)
            reduce_scatter_into(x, out)
    kinds = [(c.kind, c.dtype, c.nbytes) for c in gpu.collectives_in('work')]
    assert kinds == [('all_reduce', torch.float16, 16 * 4 * 2),
                     ('all_gather', torch.float16, 16 * 4 * 2),
                     ('reduce_scatter', torch.float16, 8 * 16 * 4 * 2)]
    assert not dist.is_initialized()


def test_host_reads_are_recorded_once_per_tolist():
    with virtual_rank(0, 2) as gpu:
        x = torch.empty(3, device='cuda')
        with gpu.phase('read'):
            assert x.tolist() == [0.0, 0.0, 0.0]  # fake values read as 0
            assert x.sum().item() == 0.0
            torch.empty(2).tolist()  # host memory: no synchronization
    reads = gpu.host_reads_in('read')
    assert [r.values for r in reads] == [3, 1]


def test_device_mismatch_raises():
    with virtual_rank(0, 2):
        with pytest.raises(FakeTensorDeviceMismatchError):
            torch.empty(2, device='cuda') + torch.ones(2)


def test_live_bytes_follow_allocation_and_release():
    with virtual_rank(0, 1) as gpu:
        with gpu.phase('alloc'):
            x = torch.empty(1000, 250, device='cuda')
            y = x * 2
            view = y[:10]
            del y
        assert gpu.live_after['alloc'] == 2 * 10**6  # y lives in its view
        assert gpu.peak_in['alloc'] == 2 * 10**6
        with gpu.phase('free'):
            del view, x
        assert gpu.live_after['free'] == 0


def test_stubs_are_removed_on_exit():
    event, backward = torch.cuda.Event, torch.Tensor.backward
    with virtual_rank(0, 1):
        assert torch.cuda.Event is not event
    assert torch.cuda.Event is event and torch.Tensor.backward is backward
    assert not dist.is_initialized()


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match=r'rank must be in \[0, 4\), got 4'):
        with virtual_rank(4, 4):
            pass


def test_work_counts_flops_and_the_bytes_kernels_touch():
    """A product's FLOPs are 2 m n k; an elementwise kernel moves its
    inputs and output; an indexed read or in-place write of 10 rows of a
    million-row table moves those rows (and the index), not the table."""
    with virtual_rank(0, 8, count_work=True) as gpu:
        with gpu.phase('work'):
            a = torch.empty(64, 32, device='cuda', dtype=torch.float16)
            b = torch.empty(32, 16, device='cuda', dtype=torch.float16)
            a @ b
            c = torch.empty(64, 32, device='cuda') + 1
            table = torch.empty(10**6, 64, device='cuda')
            rows = torch.empty(10, dtype=torch.long, device='cuda')
            table.index_select(0, rows)
            table.index_copy_(0, rows, torch.empty(10, 64, device='cuda'))
    work = {w.op: w for w in gpu.work_in('work')}
    assert (work['mm'].flops, work['mm'].dtype) == (2 * 64 * 16 * 32,
                                                    torch.float16)
    assert work['mm'].nbytes == (64 * 32 + 32 * 16 + 64 * 16) * 2
    assert work['add'].nbytes == 2 * 64 * 32 * 4
    assert work['index_select'].nbytes == 10 * 8 + 2 * 10 * 64 * 4
    assert work['index_copy_'].nbytes == 2 * (10 * 8 + 10 * 64 * 4)
    assert c.shape == (64, 32)
