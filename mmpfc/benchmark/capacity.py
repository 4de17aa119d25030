"""The reference's GPU memory table, predicted from this project's figures.

The reference figures are the "GPU Memory Utilization" table of the
insightface arcface_torch README (github.com/deepinsight/insightface,
``recognition/arcface_torch/README.md``, "Speed Benchmark"): MB per GPU on
8 x Tesla V100 32 GB, IResNet-50, mixed precision, 128 images per GPU,
as ``gpustat`` shows them (CUDA context included), and the ``gpustat``
rows of its 3M-identity speed test (``docs/speed_benchmark.md`` there).

Nothing is borrowed from them: every cell is predicted by
:func:`.gpu_memory.predict_gpu_memory` from IResNet-50's parameters and
CUDA fp16 activations, measured on a virtual GPU, the memory model's head
and the documented allowances. ``python tools/benchmark.py
--memory-table`` prints the table with the ratio per cell, and the most
identities each configuration fits.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .gpu_memory import ModelFigures, model_figures, predict_gpu_memory
from .memory_model import MemoryEstimate, largest_fitting

MB = 2**20
GB = 2**30
#: The reference's set-up: 8 GPUs, D = 512, 128 images per GPU.
REFERENCE_SETUP = dict(world_size=8, embedding_size=512, batch_size=128)
#: The reference's model: insightface's IResNet-50 (the head is predicted
#: by the memory model, so none is built).
R50 = dict(type='FaceRecognizer',
           backbone=dict(type='IResNet', depth=50, embedding_size=512,
                         dropout=0.0),
           head=None)
#: Columns of the reference's table.
METHODS = ('DP', 'MP', 'PFC0.1')
#: MB per GPU (data parallel, model parallel, Partial FC 0.1); None: the
#: reference reports that it ran out of GPU memory.
REFERENCE_MEMORY_MB: Dict[int, Tuple[Optional[int], ...]] = {
    125_000: (7358, 5306, 4868),
    250_000: (9940, 5826, 5004),
    500_000: (14220, 7114, 5202),
    1_000_000: (23708, 9966, 5620),
    1_400_000: (32252, 11178, 6056),
    2_000_000: (None, 13978, 6472),
    4_000_000: (None, 23238, 8284),
    5_500_000: (None, 32188, 9854),
    8_000_000: (None, None, 12310),
    16_000_000: (None, None, 19950),
    29_000_000: (None, None, 32324),
}
#: The reference's 3M-identity speed test, same set-up: ``gpustat`` MB of
#: its 8 GPUs, lowest and highest.
REFERENCE_3M_MB: Dict[str, Tuple[int, int]] = {
    'MP': (28860, 30338), 'PFC0.1': (10328, 10488)}
#: Label -> :func:`.memory_model.predict_memory` kwargs (SGD, momentum and
#: weight decay, as the reference trains).
CONFIGS: Dict[str, dict] = {
    'DP': dict(method='dp'),
    'MP': dict(method='pfc', sample_rate=1.0),
    'PFC0.1': dict(method='pfc', sample_rate=0.1),
    'PFC0.1 bf16/bf16': dict(method='pfc', sample_rate=0.1,
                             center_dtype='bfloat16',
                             state_dtype='bfloat16'),
    'PFC0.1 bf16/int8': dict(method='pfc', sample_rate=0.1,
                             center_dtype='bfloat16', state_dtype='int8'),
}


def r50_figures() -> ModelFigures:
    """IResNet-50's parameters and CUDA fp16 activations (a virtual GPU
    run of about a second)."""
    return model_figures(R50)


def predicted_peak(label: str, num_classes: int,
                   figures: ModelFigures) -> MemoryEstimate:
    """Predicted GPU peak per rank of ``CONFIGS[label]`` in the reference's
    set-up."""
    return predict_gpu_memory(figures, num_classes=num_classes,
                              **REFERENCE_SETUP, **CONFIGS[label])


def largest_fit(label: str, budget_gb: float,
                figures: ModelFigures) -> int:
    """Most identities of ``CONFIGS[label]`` on 8 GPUs of ``budget_gb``
    (GiB) each."""
    return largest_fitting(lambda classes: predicted_peak(
        label, classes, figures).peak <= budget_gb * GB)


def _cell(predicted: int, reference: Optional[int]) -> str:
    mb = predicted / MB
    if reference is None:
        return f'- / {mb:.0f}'
    return f'{reference} / {mb:.0f} ({mb / reference:.2f})'


def _millions(count: int) -> str:
    return f'{count / 1e6:.1f}M'


def memory_table(figures: ModelFigures) -> str:
    """Markdown: per cell the reference's MB, mmpfc's predicted MB and
    their ratio; then the 3M speed test's ``gpustat`` rows the same way."""
    head = ['identities', *[f'{m}: reference / mmpfc (ratio)'
                            for m in METHODS]]
    lines: List[str] = ['| ' + ' | '.join(head) + ' |',
                        '|' + '---:|' * len(head)]
    for classes, reference in REFERENCE_MEMORY_MB.items():
        cells = [_cell(predicted_peak(m, classes, figures).peak, ref)
                 for m, ref in zip(METHODS, reference)]
        lines.append(f'| {classes:,} | ' + ' | '.join(cells) + ' |')
    lines += ['', '| 3M speed test | gpustat MB of 8 GPUs | mmpfc MB '
              '(ratio to the highest) |', '|---|---:|---:|']
    for label, (low, high) in REFERENCE_3M_MB.items():
        peak = predicted_peak(label, 3_000_000, figures).peak / MB
        lines.append(f'| {label} | {low}-{high} | {peak:.0f} '
                     f'({peak / high:.2f}) |')
    return '\n'.join(lines)


def identities_table(figures: ModelFigures,
                     budgets_gb: Sequence[float] = (32, 80)) -> str:
    """Markdown: the most identities each configuration fits on 8 GPUs of
    each budget (r50, AMP, 128 images per GPU)."""
    head = ['configuration',
            *[f'largest C on 8 x {b:g} GB' for b in budgets_gb]]
    lines = ['| ' + ' | '.join(head) + ' |',
             '|---|' + '---:|' * len(budgets_gb)]
    for label in CONFIGS:
        fits = [largest_fit(label, b, figures) for b in budgets_gb]
        lines.append(f'| {label} | '
                     + ' | '.join(f'{f:,} ({_millions(f)})' for f in fits)
                     + ' |')
    return '\n'.join(lines)


def parts_line(estimate: MemoryEstimate) -> str:
    """``name MB, ...`` of a prediction's parts, largest first."""
    return ', '.join(f'{name} {nbytes / MB:.0f}' for name, nbytes in sorted(
        estimate.parts.items(), key=lambda item: -item[1]))
