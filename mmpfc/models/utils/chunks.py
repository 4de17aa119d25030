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
