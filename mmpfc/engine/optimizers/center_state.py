"""Optimizer state of the sharded centers in fp32, bf16 or 8 bits.

SGD momentum and the Adam moments of a shard have the shard's shape: in
fp32 they cost as much as the centers themselves. ``bfloat16`` halves them;
``int8`` stores one byte per element plus one fp32 scale per block of
:data:`BLOCK` elements (the block-wise idea of 8-bit optimizers: a scale
per small block keeps an outlier from flattening the rest of the shard).

Blocks never cross a row, so a shard re-splits by rows exactly and a step
decodes, updates and encodes only the rows it samples. A code stands for
``value = absmax * sign * (code / L) ** power``: signed states (momentum,
``exp_avg``) are linear (``power`` 1, ``L = 127``, int8), the error at most
half a step of the block's absmax, which is what the update feels;
``exp_avg_sq`` is never negative and spans decades inside a block, so it
takes 255 unsigned levels with ``power`` 4, keeping relative precision for
values a linear code would round to zero (an ``exp_avg_sq`` of zero turns
Adam's step into ``exp_avg / eps``).

In ``optimizer.state[param]`` a state ``key`` is one tensor in fp32 / bf16,
or ``key`` (the codes, int8 or uint8) and ``key + SCALE_SUFFIX`` (fp32
absmax per block) in int8; both have one row per class, so checkpoints
shard them like the centers.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from mmpfc.models.utils.chunks import copy_rows

#: Elements per quantization block (inside a row).
BLOCK = 64
#: Suffix of the state entry that holds the blocks' absmax scales.
SCALE_SUFFIX = '_absmax'
#: Accepted ``center_state_dtype`` names.
STATE_DTYPES = ('float32', 'bfloat16', 'int8')
#: State entries with one row per class that a compact form stores, and
#: whether they can be negative.
ROW_STATES = {'momentum_buffer': True, 'exp_avg': True, 'exp_avg_sq': False}


def parse_state_dtype(value: str) -> str:
    """``value`` if it names a state form; ValueError naming it otherwise."""
    if value not in STATE_DTYPES:
        raise ValueError(
            f'center_state_dtype={value!r} is not a form of the centers\' '
            f'optimizer state: use one of {list(STATE_DTYPES)}')
    return value


class RowState:
    """One row-wise state entry of a shard in a given form.

    Args:
        state: ``optimizer.state[param]`` (read and written in place).
        key: The state's name, e.g. ``'momentum_buffer'``.
        form: ``'float32'``, ``'bfloat16'`` or ``'int8'``.
    """

    def __init__(self, state: dict, key: str, form: str) -> None:
        self.state, self.key, self.form = state, key, form
        self.signed = ROW_STATES.get(key, True)

    @property
    def levels(self) -> int:
        return 127 if self.signed else 255

    @property
    def power(self) -> int:
        return 1 if self.signed else 4

    def exists(self) -> bool:
        return self.key in self.state

    def create(self, rows: int, dim: int, device: torch.device,
               param_dtype: torch.dtype = torch.float32) -> None:
        """Zeros for ``rows`` rows of ``dim`` values; ``'float32'`` means
        the parameter's dtype when it is wider (a float64 model)."""
        if self.form == 'int8':
            blocks = -(-dim // BLOCK)
            self.state[self.key] = torch.zeros(
                rows, dim, device=device,
                dtype=torch.int8 if self.signed else torch.uint8)
            self.state[self.key + SCALE_SUFFIX] = torch.zeros(
                rows, blocks, device=device)
        else:
            self.state[self.key] = torch.zeros(
                rows, dim, device=device,
                dtype=torch.bfloat16 if self.form == 'bfloat16'
                else torch.promote_types(param_dtype, torch.float32))

    def read(self, index: torch.Tensor, times: float = 1.0) -> torch.Tensor:
        """Rows ``index`` in fp32 (a new tensor), multiplied by ``times``
        (int8 linear codes take it into their scales: no extra pass)."""
        codes = self.state[self.key].index_select(0, index)
        if self.form != 'int8':
            rows = codes.float() if codes.dtype == torch.bfloat16 else codes
            return rows if times == 1.0 else rows.mul_(times)
        scales = self.state[self.key + SCALE_SUFFIX].index_select(0, index)
        if self.power == 1 and times != 1.0:
            return decode(codes, scales.mul_(times), self.levels, 1)
        rows = decode(codes, scales, self.levels, self.power)
        return rows if times == 1.0 else rows.mul_(times)

    def write(self, index: torch.Tensor, values: torch.Tensor,
              consume: bool = False) -> None:
        """Store fp32 ``values`` as rows ``index``; with ``consume`` the
        int8 encoding may overwrite ``values`` (one temporary fewer)."""
        if self.form != 'int8':
            copy_rows(self.state[self.key], index,
                      values.to(self.state[self.key].dtype))
            return
        codes, scales = encode(values, self.levels, self.power, self.signed,
                               consume)
        copy_rows(self.state[self.key], index, codes)
        self.state[self.key + SCALE_SUFFIX].index_copy_(0, index, scales)


def _blocks(values: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(R, D) -> (R, ceil(D / BLOCK), BLOCK), zero-padded; and D."""
    rows, dim = values.shape
    pad = (-dim) % BLOCK
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    return values.view(rows, -1, BLOCK), dim


def _compand(unit: torch.Tensor, power: int) -> torch.Tensor:
    """``unit ** (1 / power)`` in place (power 1, 2 or 4: square roots)."""
    for _ in range({1: 0, 2: 1, 4: 2}[power]):
        unit.sqrt_()
    return unit


def _expand(unit: torch.Tensor, power: int) -> torch.Tensor:
    """``unit ** power`` in place (power 1, 2 or 4: squares)."""
    for _ in range({1: 0, 2: 1, 4: 2}[power]):
        unit.square_()
    return unit


def encode(values: torch.Tensor, levels: int, power: int, signed: bool,
           consume: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (R, D) -> codes (R, D) and fp32 absmax (R, blocks); with
    ``consume`` the linear code is computed in ``values``' memory."""
    blocks, dim = _blocks(values.float())
    # max |x| without an |x| temporary of the rows' size
    absmax = torch.maximum(blocks.amax(dim=2), blocks.amin(dim=2).neg_())
    inverse = absmax.clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
    if power == 1:  # linear: the sign comes with the value
        scale = inverse[:, :, None].mul_(levels)
        code = (blocks.mul_(scale) if consume else blocks.mul(scale)).round_()
    else:
        code = _compand(blocks.abs().mul_(inverse[:, :, None]),
                        power).mul_(levels).round_()
        if signed:
            code.copysign_(blocks)
    code = code.to(torch.int8 if signed else torch.uint8)
    return code.view(values.shape[0], -1)[:, :dim].contiguous(), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, levels: int,
           power: int) -> torch.Tensor:
    """Codes (R, D) and absmax (R, blocks) -> fp32 (R, D)."""
    # (a mixed int8 x fp32 product is slower than a conversion and an
    # in-place fp32 product on the CPU)
    blocks, dim = _blocks(codes.float())
    if power == 1:
        values = blocks.mul_((absmax / levels)[:, :, None])
    else:
        values = _expand(blocks.abs().mul_(1.0 / levels), power).mul_(
            absmax[:, :, None])
        if codes.dtype == torch.int8:
            values.copysign_(blocks)
    return values.view(codes.shape[0], -1)[:, :dim]


def to_form(state: dict, key: str, form: str) -> Dict[str, str]:
    """Convert entry ``key`` of ``state`` (in whatever form it is) to
    ``form`` in place; returns ``{key: 'old -> new'}`` when it changed."""
    old = state_form(state, key)
    if old == form:
        return {}
    full = full_value(state, key)
    state.pop(key + SCALE_SUFFIX, None)
    target = RowState(state, key, form)
    rows, dim = full.shape
    target.create(rows, dim, full.device, full.dtype)
    target.write(torch.arange(rows, device=full.device), full)
    return {key: f'{old} -> {form}'}


def state_form(state: dict, key: str) -> str:
    """The form entry ``key`` of ``state`` is stored in."""
    if key + SCALE_SUFFIX in state:
        return 'int8'
    return 'bfloat16' if state[key].dtype == torch.bfloat16 else 'float32'


def full_value(state: dict, key: str) -> torch.Tensor:
    """Entry ``key`` of ``state`` decoded to fp32 (all rows)."""
    form = state_form(state, key)
    view = RowState(state, key, form)
    tensor = state[key]
    if form != 'int8':
        return tensor.float() if tensor.dtype == torch.bfloat16 else tensor
    return decode(tensor, state[key + SCALE_SUFFIX], view.levels, view.power)
