"""Class centers stored in 16 bits, updated in fp32.

At millions of identities the centers and their optimizer state are most of
a rank's memory; storing the centers in bfloat16 or float16 halves them.
Logits, softmax and gradients stay fp32 (rows are upcast chunk by chunk)
and the optimizer computes the update in fp32; only the write-back rounds.

Round-to-nearest would swallow most SGD steps: an update ``lr * grad`` is
often below half a unit in the last place of a bf16 weight (2^-8 relative),
so the weight would never move. :func:`stochastic_round` rounds up with the
probability of the remainder, which makes the stored value an unbiased
estimate of the fp32 update and lets small steps add up on average.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Union

import torch

from .rank_generator import RankGenerator

#: Storage dtypes of the centers, by config name.
CENTER_DTYPES = {
    'float32': torch.float32,
    'bfloat16': torch.bfloat16,
    'float16': torch.float16,
}
#: How updates of 16-bit centers are written back.
CENTER_ROUNDINGS = ('stochastic', 'nearest')
#: Largest finite float16 (centers beyond it cannot be stored in fp16).
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).replace('torch.', '')


def parse_center_dtype(value: Union[str, torch.dtype],
                       what: str = 'center_dtype') -> torch.dtype:
    """The storage dtype named by ``value``; ValueError naming it otherwise."""
    if isinstance(value, torch.dtype) and value in CENTER_DTYPES.values():
        return value
    if isinstance(value, str) and value in CENTER_DTYPES:
        return CENTER_DTYPES[value]
    raise ValueError(
        f'{what}={value!r} is not a storage dtype of the centers: use one of '
        f'{sorted(CENTER_DTYPES)}')


def parse_center_rounding(value: str) -> str:
    """``value`` if it names a rounding of 16-bit centers; ValueError
    naming it otherwise."""
    if value not in CENTER_ROUNDINGS:
        raise ValueError(f'center_rounding={value!r}: use one of '
                         f'{list(CENTER_ROUNDINGS)}')
    return value


def is_compact(dtype: torch.dtype) -> bool:
    """True for a storage dtype narrower than fp32."""
    return dtype in (torch.bfloat16, torch.float16)


def check_representable(values: torch.Tensor, dtype: torch.dtype,
                        where: str) -> None:
    """Refuse to store finite fp32 values that overflow ``dtype``.

    float16 ends at 65504: unit-scale centers are far inside, but centers
    trained without normalization or loaded from another model may not be;
    they would become inf and every logit of their class NaN.
    """
    if dtype != torch.float16 or values.numel() == 0:
        return
    largest = float(values.detach().abs().float().nan_to_num(0.0).max())
    if largest > FLOAT16_MAX:
        raise ValueError(
            f'{where}: a value of magnitude {largest:.6g} does not fit '
            f'float16 (largest {FLOAT16_MAX:g}); it would be stored as inf. '
            "Use center_dtype='bfloat16' (fp32's range) or 'float32'")


#: Index of an int32's upper 16 bits among its two int16 halves.
_UPPER_HALF = 1 if sys.byteorder == 'little' else 0


#: Entries of :class:`RoundingNoise`'s table: every 16-bit value 4 times.
NOISE_TABLE_SIZE = 2**18
#: Seed of the table's fixed order (the randomness is in the offsets).
NOISE_TABLE_SEED = 0x5EED_7AB1E


class RoundingNoise:
    """The random bits of :func:`stochastic_round`, one draw per row.

    Rounding to bf16 needs 16 uniform random bits per element; drawn from
    the CPU's generator they cost more than the rest of the rounding. Here a
    row of D elements takes instead D consecutive entries of a fixed table,
    read cyclically from a random offset: one draw per row. The table holds
    every 16-bit value equally often (in a random order), so for a uniform
    offset each element's noise is exactly uniform on [0, 2^16) and the
    rounding exactly unbiased; rows and calls draw independent offsets, so
    an element's rounding errors are independent from step to step.

    The offsets come from a per-rank :class:`RankGenerator` (saved with the
    checkpoint, so a resume rounds bit for bit as the run would have), and
    the same code runs on every device.

    Args:
        seed: Seed of the stream of offsets.
        name: What the stream is for, in warnings.
    """

    def __init__(self, seed: int, name: str = 'stochastic rounding') -> None:
        self.stream = RankGenerator(seed, name=name)
        self._table: Optional[torch.Tensor] = None  # extended for a width

    @property
    def seed(self) -> int:
        return self.stream.seed

    def state_dict(self) -> dict:
        """The stream's state (:meth:`RankGenerator.state_dict`)."""
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator on ``device``."""
        return self.stream.get(device)

    def bits(self, rows: int, width: int,
             device: torch.device) -> torch.Tensor:
        """(rows, width) int32 noise, each element uniform in [0, 2^16).

        Elements ``j`` and ``j + NOISE_TABLE_SIZE`` of one row (rows wider
        than the table) get the same noise: each is still unbiased, their
        errors are not independent.
        """
        device = torch.device(device)
        offsets = torch.randint(NOISE_TABLE_SIZE, (rows, ), device=device,
                                generator=self.generator(device))
        return self.windows(width, device).index_select(0, offsets)

    def windows(self, width: int, device: torch.device) -> torch.Tensor:
        """Every noise a row of ``width`` can get: the (NOISE_TABLE_SIZE,
        width) cyclic windows of the table (a view; the table extended by
        its first ``width - 1`` entries is kept for the next call)."""
        size = NOISE_TABLE_SIZE + width - 1
        table, device = self._table, torch.device(device)
        if table is None or table.numel() < size or not (
                table.device.type == device.type and device.index in (
                    None, table.device.index)):
            order = torch.randperm(
                NOISE_TABLE_SIZE,
                generator=torch.Generator().manual_seed(NOISE_TABLE_SEED))
            cycle = (order % 2**16).to(torch.int32)
            table = torch.cat([cycle] * (-(-size // NOISE_TABLE_SIZE)))
            self._table = table = table[:size].clone().to(device)
        return table[:size].unfold(0, width, 1)

    def __getstate__(self) -> dict:
        # the table is rebuilt on first use: copies do not carry it
        return dict(self.__dict__, _table=None)


def stochastic_round(values: torch.Tensor, dtype: torch.dtype,
                     noise: RoundingNoise) -> torch.Tensor:
    """``values`` (fp32) in ``dtype``, rounded stochastically.

    Each element becomes one of the two ``dtype`` values around it, the upper
    one with probability (distance to the lower) / (gap), so the expectation
    is the fp32 value. Values already representable, inf and NaN are kept.
    fp32 is returned as is. The random bits come from ``noise``; its rows
    are the last dimension of ``values``.
    """
    values = values.float()
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16:
        return _round_bfloat16(values, noise)
    if dtype == torch.float16:
        return _round_float16(values, noise.generator(values.device))
    raise ValueError(f'no stochastic rounding to {dtype}')


def _round_bfloat16(values: torch.Tensor,
                    noise: RoundingNoise) -> torch.Tensor:
    """bf16 is fp32's upper 16 bits: add 16 random low bits, truncate.

    The addition works on the magnitude bits of the sign-magnitude format,
    so a carry moves the magnitude up by one bf16 step for either sign. inf
    and the default NaN have zero low bits and stay as they are; a NaN with
    another payload stays NaN, or may come out as inf (payload in the low 16
    bits only) or, when its upper 16 bits are all ones but the sign
    (0x7FFF / 0xFFFF), as -0 / +0; values above bf16's largest may round up
    to inf. The rows of the noise are the last dimension (a 1-D tensor is
    one row). The result is a strided view of the sums' upper halves (no
    copy; ``index_copy_`` and any op read it as it is).
    """
    shape = values.shape
    width = shape[-1] if values.dim() else 1
    rows = math.prod(shape[:-1])
    bits = values.contiguous().view(rows, width).view(torch.int32)
    summed = noise.bits(bits.shape[0], width, bits.device).add_(bits)
    halves = summed.view(torch.int16).view(*bits.shape, 2)
    return halves[..., _UPPER_HALF].view(torch.bfloat16).view(shape)


def _round_float16(values: torch.Tensor,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
    """The nearest fp16 value and its neighbour on the other side of the
    fp32 value; the neighbour with probability |error| / gap."""
    nearest = values.to(torch.float16)
    error = values - nearest.float()
    toward = torch.where(error > 0, float('inf'), float('-inf')).to(
        torch.float16)
    other = torch.nextafter(nearest, toward)
    gap = (other.float() - nearest.float()).abs()
    draw = torch.rand(values.shape, device=values.device,
                      generator=generator)
    take_other = (draw * gap < error.abs()) & torch.isfinite(gap)
    return torch.where(take_other, other, nearest)
