"""Normal draws that are a pure function of (seed, counter, index).

A margin drawn per row must be the same on every rank, be saved with the
model and survive a move between devices. A stateful ``torch.Generator``
gives none of that for free (its state lives on the host, CPU and CUDA
streams differ, and reading a device buffer back costs a synchronization).
Here the state is two int64 buffers (seed, number of draws) that live with
the model; the draws are computed on the device with integer hashing, give
the same values on the CPU and on GPUs, and read nothing back.
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, const: int) -> torch.Tensor:
    """``x * const mod 2**32`` for ``x`` in [0, 2**32), without int64
    overflow (the constant is split in 16-bit halves)."""
    low, high = const & 0xFFFF, const >> 16
    return (x * low + ((x * high) & 0xFFFF) * 65536) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds) on int64 values in
    [0, 2**32); all shifts act on non-negative values (logical)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _words(value: torch.Tensor):
    """Low and high 32-bit words of non-negative int64 ``value``."""
    return value & _MASK32, (value >> 32) & _MASK32


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor,
                    index: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in (0, 1), one per ``index`` (int64 >= 0).

    (seed, counter) are hashed into two 32-bit keys first; each index is
    then mixed with both keys, so that no simple relation between indices
    of different counters gives equal draws.
    """
    key = torch.zeros_like(seed)
    for word in (*_words(seed), *_words(counter)):
        key = hash32(key ^ word)
    key2 = hash32(key ^ 0x5BD1E995)
    x = hash32((index & _MASK32) ^ key)
    x = hash32((x + key2) & _MASK32)
    return (x.double() + 0.5) / 2.0**32


def counter_normal(seed: torch.Tensor, counter: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
    """Float64 standard normals, one per ``index`` (Box-Muller on two
    uniforms of indices ``2 i`` and ``2 i + 1``)."""
    u1 = counter_uniform(seed, counter, 2 * index)
    u2 = counter_uniform(seed, counter, 2 * index + 1)
    return (-2.0 * u1.log()).sqrt() * torch.cos(2.0 * math.pi * u2)
