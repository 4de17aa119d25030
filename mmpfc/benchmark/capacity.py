"""Identities per GPU: the reference's memory table beside the model's.

The reference figures are the "GPU Memory Utilization" table of the
insightface arcface_torch README (github.com/deepinsight/insightface,
``recognition/arcface_torch/README.md``, "Speed Benchmark"): MB per GPU on
8 x Tesla V100 32 GB, IResNet-50, mixed precision, 128 images per GPU,
as ``gpustat`` shows them (CUDA context included). The model
(:mod:`.memory_model`) predicts the head; the backbone's share of a GPU
(IResNet-50 under AMP, the CUDA context, the allocator's cache) is not
modelled on a GPU, so it is taken from the reference itself: its Partial
FC 0.1 figure at 125,000 identities minus the head the model predicts
there. ``python tools/benchmark.py --memory-table`` prints this table.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from .memory_model import max_num_classes, predict_memory

MB = 2**20
GB = 2**30
#: The reference's set-up: 8 GPUs, D = 512, 128 images per GPU.
REFERENCE_SETUP = dict(world_size=8, embedding_size=512, batch_size=128)
#: MB per GPU (data parallel, model parallel, Partial FC 0.1); None: the
#: reference reports that it ran out of GPU memory.
REFERENCE_MEMORY_MB: Dict[int, Tuple[Optional[int], ...]] = {
    125_000: (7358, 5306, 4868),
    1_400_000: (32252, 11178, 6056),
    5_500_000: (None, 32188, 9854),
    8_000_000: (None, None, 12310),
    16_000_000: (None, None, 19950),
    29_000_000: (None, None, 32324),
}
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
#: The configurations given a predicted column beside the reference's.
PREDICTED_COLUMNS = ('PFC0.1', 'PFC0.1 bf16/bf16', 'PFC0.1 bf16/int8')


def head_peak(label: str, num_classes: int) -> int:
    """Predicted head bytes per GPU of ``CONFIGS[label]`` in the reference's
    set-up (runtime slack included, no backbone)."""
    return predict_memory(num_classes=num_classes, **REFERENCE_SETUP,
                          **CONFIGS[label]).peak


def backbone_share() -> int:
    """Bytes per GPU that are not the head, read off the reference: Partial
    FC 0.1 at 125,000 identities, where its head is small (~0.1 GB)."""
    return REFERENCE_MEMORY_MB[125_000][2] * MB - head_peak('PFC0.1', 125_000)


def largest_fit(label: str, budget_gb: float) -> int:
    """Most identities of ``CONFIGS[label]`` on 8 GPUs of ``budget_gb``
    (GiB) each, the backbone's share taken off every GPU's budget."""
    kwargs = dict(CONFIGS[label])
    setup = dict(REFERENCE_SETUP)
    return max_num_classes(budget_gb * GB - backbone_share(),
                           kwargs.pop('method'), setup.pop('world_size'),
                           **setup, **kwargs)


def _millions(count: int) -> str:
    return f'{count / 1e6:.1f}M'


def identities_table(budgets_gb: Sequence[float] = (32, 80),
                     columns: Sequence[str] = PREDICTED_COLUMNS) -> str:
    """Markdown: the reference's MB per GPU with the model's predictions,
    then the most identities each configuration fits per budget."""
    share = backbone_share()
    head = ['identities', 'reference DP', 'reference MP',
            'reference PFC0.1', *[f'mmpfc {c}' for c in columns]]
    lines: List[str] = ['| ' + ' | '.join(head) + ' |',
                        '|' + '---:|' * len(head)]
    for classes, ref in REFERENCE_MEMORY_MB.items():
        cells = [f'{classes:,}'] + ['-' if v is None else str(v) for v in ref]
        cells += [f'{(head_peak(c, classes) + share) / MB:.0f}'
                  for c in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', f'Backbone share per GPU: {share / MB:.0f} MB (reference '
              f"PFC0.1 at 125,000 minus the predicted head, "
              f"{head_peak('PFC0.1', 125_000) / MB:.0f} MB).", '']
    head = ['configuration',
            *[f'largest C on 8 x {b:g} GB' for b in budgets_gb]]
    lines += ['| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * len(
        budgets_gb)]
    for label in CONFIGS:
        fits = [largest_fit(label, b) for b in budgets_gb]
        lines.append(f'| {label} | '
                     + ' | '.join(f'{f:,} ({_millions(f)})' for f in fits)
                     + ' |')
    return '\n'.join(lines)
