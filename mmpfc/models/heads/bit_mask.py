"""The positions of clamped cosines, kept as one bit each.

The fused step clamps cosines that rounding pushed outside [-1, 1] (or the
margin's tighter bound) and gives them no gradient. Remembering where
without reading the device (no host-device synchronization on CUDA) takes
a mask of S x N bits, packed here eight to a byte; on the CPU, where a read
costs nothing, the step finds the few clamped positions instead
(:data:`BIT_MASK_CLAMP`).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

#: By device type: keep the clamped positions as a bit mask (True, the
#: default: no device read) or find them with ``aminmax`` + ``nonzero``.
BIT_MASK_CLAMP = {'cpu': False}
#: Logits whose clamp mask is made or applied at a time (bounds the
#: temporaries of the bit mask to a few bytes per element of a block).
MASK_BLOCK = 2**22


def keeps_bit_mask(device: torch.device) -> bool:
    """Whether the clamped positions on ``device`` are kept as bits."""
    return BIT_MASK_CLAMP.get(device.type, True)


def bit_weights(device: torch.device) -> torch.Tensor:
    """(1, 2, 4, ..., 128) as uint8, made on ``device`` (no host-to-device
    copy); cheap enough to build once per mask rather than cache."""
    return torch.bitwise_left_shift(
        torch.ones(8, dtype=torch.uint8, device=device),
        torch.arange(8, dtype=torch.uint8, device=device))


def pack_bits(mask: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, N) bool -> (R, ceil(N / 8)) uint8; bit ``j % 8`` of byte
    ``j // 8`` of a row is ``mask[row, j]``."""
    rows, width = mask.shape
    pad = (-width) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(rows, pad)], dim=1)
    if weights is None:
        weights = bit_weights(mask.device)
    return (mask.view(rows, -1, 8).to(torch.uint8) * weights).sum(
        dim=2, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, width: int,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (R, ``width``) bool mask that :func:`pack_bits` packed."""
    if weights is None:
        weights = bit_weights(bits.device)
    mask = (bits.unsqueeze(2) & weights).ne(0)
    return mask.view(bits.shape[0], -1)[:, :width]


def _row_blocks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, MASK_BLOCK // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, start + step)


def pack_clamped(cos: torch.Tensor, bits: torch.Tensor,
                 bound: float = 1.0) -> None:
    """Write into ``bits`` where the (R, N) ``cos`` lies outside
    [-bound, bound]."""
    weights = bit_weights(cos.device)
    for rows in _row_blocks(cos.shape[0], cos.shape[1]):
        block = cos[rows]
        bits[rows] = pack_bits((block < -bound) | (block > bound), weights)


def zero_clamped(grad: torch.Tensor, bits: torch.Tensor) -> None:
    """Zero the entries of the (R, N) ``grad`` that ``bits`` marks."""
    width = grad.shape[1]
    weights = bit_weights(grad.device)
    for rows in _row_blocks(grad.shape[0], width):
        grad[rows].masked_fill_(unpack_bits(bits[rows], width, weights), 0.0)
