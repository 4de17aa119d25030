"""The label range check of a head, without stalling the GPU.

Reading a device value on the host waits for every kernel queued before it.
On the CPU that costs nothing and labels are checked at once; on CUDA the
smallest and largest label of a step are copied to pinned host memory
asynchronously and looked at when the next step starts, by which time the
copy is done. A bad label is then reported one step late: that step has
already run with the label, which matched no center (its row counted no
target logit), and the error stops training before the next one.
"""
from __future__ import annotations

from typing import List, Optional

import torch


class LabelRangeCheck:
    """Raise ValueError for labels outside ``[0, num_classes)``.

    Call it with the labels of every step (:meth:`__call__`); call
    :meth:`flush` to read a pending CUDA result at once (e.g. after the
    last step).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._host: Optional[torch.Tensor] = None  # pinned (min, max)
        self._event = None  # recorded after the copy into _host
        self._pending = False

    def __call__(self, labels: torch.Tensor) -> None:
        """Check ``labels`` now (CPU, other devices) or at the next call
        (CUDA), raising for a pending bad result first."""
        self.flush()
        if not labels.numel():
            return
        if labels.device.type != 'cuda':
            low, high = torch.stack(list(torch.aminmax(labels))).tolist()
            if low < 0 or high >= self.num_classes:
                bad = labels[(labels < 0) | (labels >= self.num_classes)]
                raise self._error(bad[:5].tolist())
            return
        if self._host is None:
            self._host = torch.empty(2, dtype=torch.long, pin_memory=True)
            self._event = torch.cuda.Event()
        self._host.copy_(torch.stack(list(torch.aminmax(labels.long()))),
                         non_blocking=True)
        self._event.record(torch.cuda.current_stream(labels.device))
        self._pending = True

    def flush(self) -> None:
        """Read a pending CUDA result (waiting for it if needed); raise if
        that step had a label out of range."""
        if not self._pending:
            return
        self._pending = False
        if not self._event.query():
            self._event.synchronize()
        low, high = self._host.tolist()
        bad = [v for v in (low, high) if not 0 <= v < self.num_classes]
        if bad:
            raise self._error(
                bad, ' in the previous step (smallest and largest label of '
                'its global batch; on CUDA the check is read one step late)')

    def _error(self, bad: List[int], where: str = '') -> ValueError:
        return ValueError(
            f'labels must be in [0, {self.num_classes}), got {bad}{where} '
            f'(num_classes={self.num_classes})')

    # A copied or pickled head starts without a pending result.
    def __deepcopy__(self, memo: dict) -> 'LabelRangeCheck':
        return LabelRangeCheck(self.num_classes)

    def __getstate__(self) -> dict:
        return dict(num_classes=self.num_classes)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['num_classes'])
