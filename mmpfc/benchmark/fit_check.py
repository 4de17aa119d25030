"""Will a config fit, and how fast will it run, on GPUs not yet rented?

:func:`check_fit` answers from this machine, GPU or not, in seconds: the
config's model is built on a virtual GPU (:mod:`mmpfc.testing`) to measure
its replicated parameters and CUDA fp16 activations; the memory model and
the GPU allowances (:mod:`.gpu_memory`) give the peak per GPU; the memory
model, inverted, what would fit; one virtual training step per variant
(the config, its head at sample rate 1.0 and 0.1, a one-class head) gives
the work that :mod:`.step_time` turns into seconds on a GPU of the table.
``python tools/fit_check.py CONFIG --gpus N --gpu-memory SIZE`` prints it.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from mmengine.config import Config
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from .gpu_memory import ModelFigures, model_figures, predict_gpu_memory
from .memory_model import MemoryEstimate, largest_fitting
from .step_time import GPU, gpu_by_name, step_seconds

_UNITS = {'': 2**30, 'b': 1, 'k': 2**10, 'kb': 2**10, 'kib': 2**10,
          'm': 2**20, 'mb': 2**20, 'mib': 2**20, 'g': 2**30, 'gb': 2**30,
          'gib': 2**30, 't': 2**40, 'tb': 2**40, 'tib': 2**40}
#: Sample rates tried when the config's does not fit.
SAMPLE_RATES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
#: Storages of the sharded centers and their state, most exact first.
STORAGES = (('float32', 'float32'), ('bfloat16', 'bfloat16'),
            ('bfloat16', 'int8'))


def parse_size(text: str) -> int:
    """``'32GB'``, ``'24 GiB'``, ``'16000MB'``, ``'80'`` (GiB) -> bytes.
    Binary units (a GPU's "32 GB" is 32 GiB, as ``nvidia-smi`` counts)."""
    match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*',
                         str(text))
    unit = match and match[2].lower()
    if not match or unit not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f'GPU memory {text!r} is not a size: write a '
                         "positive number with a unit, e.g. '32GB', "
                         "'24GiB', '16000MB' (no unit: GiB)")
    return int(float(match[1]) * _UNITS[unit])


@dataclass
class HeadSetup:
    """What the memory model needs of a config's head and optimizer."""
    method: str  # 'pfc' (sharded) or 'dp' (replicated centers)
    num_classes: int
    kwargs: Dict[str, object] = field(default_factory=dict)
    backbone_states: int = 1  # fp32 optimizer states per parameter

    @property
    def sampled(self) -> bool:
        return self.method == 'pfc'


@dataclass
class FitReport:
    """What :func:`check_fit` found; ``to_dict`` is the ``--json`` form."""
    config: str
    gpus: int
    gpu_memory: int
    batch_size: int
    peak_bytes: int
    fits: bool
    parts: Dict[str, int]
    max_num_classes: int
    max_batch_size: int
    num_classes: int
    sample_rate: Optional[float]
    fitting_sample_rate: Optional[float]
    fitting_storage: Optional[Tuple[str, str]]
    gpu: str
    step_seconds: Dict[str, float]
    samples_per_second: float
    head_share: Optional[float]  # None: a replicated head (not estimated)
    pfc_over_mp: Optional[float]
    timing_note: str = ''

    def to_dict(self) -> dict:
        return asdict(self)


def head_setup(cfg: Config, world_size: int) -> HeadSetup:
    """The head's kind, size and storage, and the optimizer's states,
    read from the model built on a virtual GPU (defaults included)."""
    from mmpfc.testing import virtual_rank
    from mmpfc.testing.virtual_step import build_on_virtual_gpu
    optim = cfg.get('optim_wrapper') or {}
    optimizer = dict(optim.get('optimizer') or {})
    kind = str(optimizer.get('type', 'SGD')).lower()
    adam = kind.startswith('adam')
    momentum = adam or float(optimizer.get('momentum', 0) or 0) > 0
    common = dict(momentum=momentum,
                  weight_decay=float(optimizer.get('weight_decay', 0)
                                     or 0) > 0,
                  optimizer='adam' if adam else 'sgd')
    states = 2 if adam else int(momentum)
    with virtual_rank(0, world_size):
        head = build_on_virtual_gpu(cfg.model).head
    if head is None:
        raise ValueError('the config has no head: nothing to fit')
    classes, dim = int(head.num_classes), int(head.in_channels)
    if hasattr(head, 'sampler'):  # the sharded, sampled head
        margin = getattr(head, 'margin_loss', None)
        return HeadSetup('pfc', classes, dict(
            common, embedding_size=dim, sample_rate=float(head.sample_rate),
            center_dtype=str(head.weight.dtype).replace('torch.', ''),
            state_dtype=str(optim.get('center_state_dtype', 'float32')),
            num_subcenters=int(getattr(head, 'num_subcenters', 1)),
            non_target_margin=bool(getattr(margin, 'modifies_non_target',
                                           False))), states)
    return HeadSetup('dp', classes, dict(embedding_size=dim,
                                         momentum=momentum), states)


def predict(figures: ModelFigures, setup: HeadSetup, world_size: int,
            **changes) -> MemoryEstimate:
    """The peak per GPU of ``setup`` with ``changes`` (``batch_size``,
    ``num_classes`` or other memory-model kwargs)."""
    kwargs = dict(setup.kwargs, method=setup.method,
                  num_classes=setup.num_classes)
    kwargs.update(changes)
    return predict_gpu_memory(figures, world_size=world_size,
                              backbone_states=setup.backbone_states,
                              **kwargs)


def _with_head(cfg: Config, **head) -> Config:
    variant = copy.deepcopy(cfg)
    variant.model.head.update(head)
    return variant


def _timed(cfg: Config, world_size: int, batch_size: int,
           gpu: GPU) -> Dict[str, float]:
    """Seconds per phase of one virtual step of ``cfg`` on ``gpu``, as
    rank 0 (its shard is the largest, by at most one row)."""
    from mmpfc.testing.virtual_step import run_virtual_step
    step = run_virtual_step(cfg, 0, world_size, batch_size,
                            count_work=True)
    return step_seconds(step.gpu, world_size, step.param_bytes, gpu)


def check_fit(cfg: Config, gpus: int, gpu_memory: Optional[int] = None,
              gpu: str = 'V100', config_name: str = '',
              timing: bool = True) -> FitReport:
    """Fit and speed of ``cfg`` on ``gpus`` GPUs of ``gpu_memory`` bytes
    (default: the memory of ``gpu``), see the module doc."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f'--gpus must be a positive integer, got {gpus!r}')
    device = gpu_by_name(gpu)
    budget = device.memory if gpu_memory is None else gpu_memory
    batch = int((cfg.get('train_dataloader') or {}).get('batch_size', 128))
    setup, figures = _measure_model(cfg, gpus, config_name)
    estimate = predict(figures, setup, gpus, batch_size=batch)
    fit = _what_fits(figures, setup, gpus, batch, budget)
    speed = _estimate_speed(cfg, setup, gpus, batch, device) if timing \
        else _SpeedEstimate()
    total = speed.times.get('total')
    return FitReport(
        config=config_name, gpus=gpus, gpu_memory=budget, batch_size=batch,
        peak_bytes=estimate.peak, fits=estimate.peak <= budget,
        parts=dict(estimate.parts), max_num_classes=fit.max_num_classes,
        max_batch_size=fit.max_batch_size, num_classes=setup.num_classes,
        sample_rate=setup.kwargs.get('sample_rate'),
        fitting_sample_rate=fit.sample_rate, fitting_storage=fit.storage,
        gpu=device.name, step_seconds=speed.times,
        samples_per_second=gpus * batch / total if total else 0.0,
        head_share=speed.head_share, pfc_over_mp=speed.pfc_over_mp,
        timing_note=speed.note)


def _measure_model(cfg: Config, gpus: int,
                   config_name: str) -> Tuple[HeadSetup, ModelFigures]:
    """The head's setup and the rest of the model's figures, a registry
    or constructor error turned into a ``ValueError`` naming the config."""
    try:
        return head_setup(cfg, gpus), model_figures(dict(cfg.model,
                                                         head=None))
    except ValueError:
        raise
    except Exception as err:  # a registry or constructor error
        raise ValueError(f'the model of {config_name or "the config"} '
                         f'cannot be built: {type(err).__name__}: {err}'
                         ) from err


@dataclass(frozen=True)
class _Fit:
    """The most identities and the largest batch that fit; for a sampled
    head that does not, a smaller sample rate or a storage that would."""
    max_num_classes: int
    max_batch_size: int
    sample_rate: Optional[float] = None
    storage: Optional[Tuple[str, str]] = None


def _what_fits(figures: ModelFigures, setup: HeadSetup, gpus: int,
               batch: int, budget: int) -> _Fit:
    def fits(**changes) -> bool:
        return predict(figures, setup, gpus, **dict(
            dict(batch_size=batch), **changes)).peak <= budget

    max_classes = largest_fitting(lambda c: fits(num_classes=c))
    max_batch = largest_fitting(lambda b: fits(batch_size=b))
    if not setup.sampled or fits():
        return _Fit(max_classes, max_batch)
    current = setup.kwargs['sample_rate']
    rate = next((r for r in SAMPLE_RATES
                 if r < current and fits(sample_rate=r)), None)
    storage = next((s for s in STORAGES if fits(
        center_dtype=s[0], state_dtype=s[1])), None)
    return _Fit(max_classes, max_batch, rate, storage)


@dataclass(frozen=True)
class _SpeedEstimate:
    """Seconds per phase of a step, the head's share of it, the PFC0.1 /
    MP speed ratio of a sampled head, or why there is no estimate."""
    times: Dict[str, float] = field(default_factory=dict)
    head_share: Optional[float] = None
    pfc_over_mp: Optional[float] = None
    note: str = ''


def _estimate_speed(cfg: Config, setup: HeadSetup, gpus: int, batch: int,
                    device: GPU) -> _SpeedEstimate:
    """One virtual step of the config and, for a sharded head, one without
    it (a one-class head) and one at sample rate 1.0 and 0.1 (the config's
    own step where it already samples at that rate). A replicated head's
    share is not estimated (None)."""
    try:
        times = _timed(cfg, gpus, batch, device)
    except DynamicOutputShapeException as err:
        return _SpeedEstimate(note=(
            f'no step-time estimate: {err.func} makes a tensor '
            'whose size depends on values, which a virtual GPU '
            'does not have (the sampler of a small shard, where '
            'num_classes * sample_rate / gpus <= the global batch)'))
    if not setup.sampled:  # no one-class stand-in for a replicated head
        return _SpeedEstimate(times)
    no_head = _timed(_with_head(cfg, num_classes=gpus, sample_rate=1.0),
                     gpus, batch, device)
    share = max(0.0, 1 - no_head['total'] / times['total'])

    def at_rate(rate: float) -> Dict[str, float]:
        if setup.kwargs['sample_rate'] == rate:
            return times
        return _timed(_with_head(cfg, sample_rate=rate), gpus, batch,
                      device)

    ratio = at_rate(1.0)['total'] / at_rate(0.1)['total']
    return _SpeedEstimate(times, share, ratio)


def describe(report: FitReport) -> str:
    """The report as text for a terminal."""
    gib = 2**30
    lines: List[str] = [
        f'{report.config or "config"}: {report.gpus} GPU(s) of '
        f'{report.gpu_memory / gib:.1f} GiB, {report.batch_size} images '
        f'per GPU, {report.num_classes:,} identities',
        f'peak per GPU: {report.peak_bytes / gib:.2f} GiB -> '
        + ('fits' if report.fits else 'DOES NOT FIT'),
        '  ' + ', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in sorted(
            report.parts.items(), key=lambda item: -item[1])),
        f'largest num_classes at this batch and storage: '
        f'{report.max_num_classes:,}',
        f'largest batch per GPU at these identities: '
        f'{report.max_batch_size}']
    if not report.fits:
        if report.fitting_sample_rate is not None:
            lines.append(f'fits with sample_rate={report.fitting_sample_rate}')
        if report.fitting_storage is not None:
            center, state = report.fitting_storage
            lines.append(f"fits with center_dtype='{center}', "
                         f"center_state_dtype='{state}'")
    if report.timing_note:
        lines.append(report.timing_note)
    if report.step_seconds:
        t = report.step_seconds
        lines += [
            f'estimated step on {report.gpu}: {t["total"] * 1e3:.0f} ms '
            f'(forward {t["forward"] * 1e3:.0f}, backward '
            f'{t["backward"] * 1e3:.0f}, optimizer {t["step"] * 1e3:.0f}) '
            f'-> {report.samples_per_second:,.0f} samples/s',
            f'the head takes {report.head_share:.0%} of the step'
            if report.head_share is not None else
            "the head's share of the step: not estimated for a replicated "
            'head']
        if report.pfc_over_mp is not None:
            lines.append(f'Partial FC 0.1 / model parallel speed: '
                         f'{report.pfc_over_mp:.2f}x')
    return '\n'.join(lines)
