"""The heads both benchmarks compare, by name: ``dp``, ``mp``, ``pfc<rate>``.

The speed benchmark (:mod:`.speed`) and the accuracy benchmark
(:mod:`.accuracy`) read the same names, so their tables label the same
head alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class HeadMethod:
    """One head by the fields that build it.

    Attributes:
        label: The table's name of it (``'DP'``, ``'MP'``, ``'PFC0.1'``).
        method: ``'dp'`` (replicated centers) or ``'pfc'`` (sharded).
        sample_rate: Fraction of the shard sampled per step (1.0 for DP
            and for model parallel).
    """
    label: str
    method: str
    sample_rate: float

    @property
    def sharded(self) -> bool:
        return self.method == 'pfc'


def parse_method(spec: str) -> HeadMethod:
    """``'dp'``, ``'mp'`` or ``'pfc<rate>'`` (e.g. ``'pfc0.1'``)."""
    text = spec.strip().lower()
    if text == 'dp':
        return HeadMethod(label='DP', method='dp', sample_rate=1.0)
    if text == 'mp':
        return HeadMethod(label='MP', method='pfc', sample_rate=1.0)
    match = re.fullmatch(r'pfc([0-9.]+)', text)
    if match:
        rate = float(match.group(1))
        if 0.0 <= rate <= 1.0:
            return HeadMethod(
                label=f'PFC{match.group(1)}' if rate < 1 else 'MP',
                method='pfc', sample_rate=rate)
    raise ValueError(f"method {spec!r}: expected 'dp', 'mp' or 'pfc<rate>' "
                     "with a rate in [0, 1], e.g. 'pfc0.1'")
