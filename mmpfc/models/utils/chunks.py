"""How many rows of a shard are read or written at a time.

The fused head gathers sampled centers, and the sparse optimizer steps
update them, in chunks of this many bytes, so that their temporaries stay
small whatever the number of rows: small on the CPU (cache-sized), large on
GPUs (fewer kernel launches).
"""
from __future__ import annotations

import torch

#: Bytes of one chunk of rows, by device type (other types: the CUDA value).
CHUNK_BYTES = {'cpu': 2**20, 'cuda': 256 * 2**20}


def rows_per_chunk(row_bytes: int, device: torch.device | str) -> int:
    """Rows of ``row_bytes`` each in one chunk on ``device`` (at least 1)."""
    kind = torch.device(device).type
    budget = CHUNK_BYTES.get(kind, CHUNK_BYTES['cuda'])
    return max(1, budget // max(1, row_bytes))


def copy_rows(dest: torch.Tensor, index: torch.Tensor,
              rows: torch.Tensor) -> torch.Tensor:
    """``dest.index_copy_(0, index, rows)`` for whole 2-D rows, moved as
    8-byte words when each row is a whole number of them.

    ``index_copy_`` costs per element more than per byte: int8 rows of 512
    codes copy about 4x faster as 64 words each (one core), bf16 rows
    about 1.6x; fp32 rows are bound by memory either way.
    """
    if _as_words(dest) and _as_words(rows) and rows.dtype == dest.dtype \
            and rows.shape[1:] == dest.shape[1:]:
        dest.view(torch.int64).index_copy_(0, index, rows.view(torch.int64))
    else:
        dest.index_copy_(0, index, rows)
    return dest


def _as_words(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s 2-D rows can be seen as 8-byte words."""
    size = tensor.element_size()
    return (tensor.dim() == 2 and size < 8 and tensor.shape[1] > 0
            and tensor.stride(1) == 1
            and tensor.shape[1] * size % 8 == 0
            and tensor.stride(0) * size % 8 == 0
            and tensor.storage_offset() * size % 8 == 0)
