"""Row copies of a shard: whole rows land where plain indexing puts them."""
import pytest
import torch

from mmpfc.models.utils.chunks import copy_rows


@pytest.mark.parametrize('dtype,width', [
    (torch.int8, 512), (torch.uint8, 128), (torch.bfloat16, 64),
    (torch.float32, 6), (torch.int8, 5), (torch.float64, 3)])
def test_copy_rows_writes_the_rows_at_their_index(dtype, width):
    gen = torch.Generator().manual_seed(0)
    dest = torch.randint(0, 100, (20, width), generator=gen).to(dtype)
    rows = torch.randint(0, 100, (4, width), generator=gen).to(dtype)
    index = torch.tensor([17, 2, 9, 0])
    expected = dest.clone()
    for position, row in enumerate(index.tolist()):
        expected[row] = rows[position]
    assert copy_rows(dest, index, rows) is dest
    assert torch.equal(dest, expected)


def test_copy_rows_takes_strided_and_offset_sources():
    dest = torch.zeros(10, 16, dtype=torch.int8)
    base = torch.arange(3 * 33, dtype=torch.int16).to(torch.int8)
    rows = base[1:].view(2, 49)[:, 1:17]  # odd offset, row stride 49
    index = torch.tensor([3, 8])
    copy_rows(dest, index, rows)
    assert torch.equal(dest[3], rows[0]) and torch.equal(dest[8], rows[1])
    assert dest.sum(dim=1).nonzero().flatten().tolist() == [3, 8]
    shifted = base[3:35].view(2, 16)  # contiguous, 3 bytes into its storage
    copy_rows(dest, index, shifted)
    assert torch.equal(dest[[3, 8]], shifted)


def test_copy_rows_keeps_index_copy_checks_and_odd_row_strides():
    dest = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match='same dtype'):
        copy_rows(dest, torch.tensor([1]),
                  torch.full((1, 8), 200, dtype=torch.uint8))
    # one row of a wider tensor: contiguous to torch, row stride 9 bytes
    source = torch.arange(27, dtype=torch.int8).view(3, 9)[1:2, :8]
    one = torch.zeros(1, 8, dtype=torch.int8)[:, :]
    copy_rows(one, torch.tensor([0]), source)
    assert one[0].tolist() == list(range(9, 17))
    wide = torch.zeros(2, 9, dtype=torch.int8)[:, :8]  # row stride 9
    copy_rows(wide, torch.tensor([1]), source)
    assert wide[1].tolist() == list(range(9, 17)) and not wide[0].any()
