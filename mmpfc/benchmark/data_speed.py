"""How fast one DataLoader worker turns a config's RecordIO training set into
batches, beside the bare JPEG decoding of the same bytes, and how many
workers a GPU needs.

:func:`measure_data_speed` builds the config's train dataloader as MMEngine's
Runner does (dataset, pipeline, sampler, collate), with one worker (or none:
in-process) and one thread, on a synthetic set it writes
(:mod:`.synthetic_faces`) or the user's folder. Rounds alternate the bare
``cv2.imdecode`` of the images' bytes and the loader over as many images, so
both see the same machine load; the best round of each is reported, and their
ratio. With one worker a third loader runs in the rounds too: a worker that
only decodes the same bytes (``cv2.imdecode``) and packs them with
``face_collate``, the least a worker delivering decoded batches costs here
(the shared-memory batch and its trip to the main process included), so the
pipeline's own overhead can be told from the DataLoader's.
``python tools/benchmark_data.py CONFIG`` prints it.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import cv2
import numpy as np
import torch
from mmengine.config import Config, ConfigDict

from mmpfc.datasets import face_collate

from .synthetic_faces import write_synthetic_faces

#: Wait before timing the bare decoding, while the workers refill their
#: prefetch queues (a few batches of ~25 ms each).
SETTLE_SECONDS = 0.5

#: The two pipelines ``--pipeline`` names, each (transforms, collate).
PIPELINES = {
    'lean': ([dict(type='LoadImageFromBytes'),
              dict(type='RandomFlipInPlace', prob=0.5)],
             dict(type='mmpfc.face_collate')),
    'mmpretrain': ([dict(type='LoadImageFromBytes'),
                    dict(type='mmpretrain.RandomFlip', prob=0.5,
                         direction='horizontal'),
                    dict(type='mmpretrain.PackInputs')],
                   dict(type='pseudo_collate')),
}


@dataclass
class DataSpeed:
    """One measurement; rates in images/s, one entry per round."""
    config: str
    pipeline: str
    data_root: str
    synthetic: bool
    num_images: int
    mean_bytes: float
    batch_size: int
    num_workers: int
    pipeline_rates: List[float] = field(default_factory=list)
    decode_rates: List[float] = field(default_factory=list)
    samples_per_sec: Optional[float] = None
    #: a worker that only decodes and packs (one worker only)
    worker_floor_rates: List[float] = field(default_factory=list)

    @property
    def pipeline_rate(self) -> float:
        return max(self.pipeline_rates)

    @property
    def decode_rate(self) -> float:
        return max(self.decode_rates)

    @property
    def ratio(self) -> float:
        """Pipeline images/s over bare decoding's (1.0: no overhead)."""
        return self.pipeline_rate / self.decode_rate

    @property
    def worker_floor_rate(self) -> Optional[float]:
        return max(self.worker_floor_rates, default=None)

    @property
    def floor_ratio(self) -> Optional[float]:
        """Pipeline images/s over those of a worker that only decodes."""
        floor = self.worker_floor_rate
        return None if floor is None else self.pipeline_rate / floor

    @property
    def workers_needed(self) -> Optional[int]:
        """Workers that keep up with ``samples_per_sec`` per GPU."""
        if self.samples_per_sec is None:
            return None
        return workers_needed(self.samples_per_sec, self.pipeline_rate)

    def to_dict(self) -> dict:
        return dict(asdict(self), pipeline_rate=self.pipeline_rate,
                    decode_rate=self.decode_rate, ratio=self.ratio,
                    worker_floor_rate=self.worker_floor_rate,
                    floor_ratio=self.floor_ratio,
                    workers_needed=self.workers_needed, threads=1)


def workers_needed(samples_per_sec: float, per_worker: float) -> int:
    """DataLoader workers per GPU for ``samples_per_sec``, each delivering
    ``per_worker`` images/s (at least one)."""
    if samples_per_sec <= 0 or per_worker <= 0:
        raise ValueError(f'samples_per_sec={samples_per_sec} and per_worker='
                         f'{per_worker} must be positive')
    return max(1, math.ceil(samples_per_sec / per_worker))


def train_loader_config(cfg: Config, pipeline: str = 'config') -> ConfigDict:
    """A copy of ``cfg.train_dataloader`` with ``pipeline``: ``'config'``
    (as it is) or a name of :data:`PIPELINES`; refuses datasets that are not
    RecordIO (nothing to decode)."""
    loader = copy.deepcopy(cfg.get('train_dataloader'))
    if not loader or 'dataset' not in loader:
        raise ValueError('the config has no train_dataloader.dataset')
    kind = str(loader.dataset.get('type', ''))
    if kind.split('.')[-1] != 'MXFaceDataset':
        raise ValueError(f'the train dataset is {kind!r}: the data '
                         'benchmark reads RecordIO sets (MXFaceDataset)')
    if pipeline != 'config':
        if pipeline not in PIPELINES:
            raise ValueError(f'pipeline {pipeline!r} is not one of '
                             f"{['config', *PIPELINES]}")
        transforms, collate = PIPELINES[pipeline]
        loader.dataset.pipeline = copy.deepcopy(transforms)
        loader.collate_fn = dict(collate)
    return loader


def measure_data_speed(cfg: Config,
                       config_name: str = '',
                       pipeline: str = 'config',
                       data_root: Optional[str] = None,
                       num_images: int = 6000,
                       num_classes: int = 3000,
                       num_workers: int = 1,
                       rounds: int = 3,
                       samples_per_sec: Optional[float] = None,
                       seed: int = 0) -> DataSpeed:
    """Measure the config's train pipeline; see the module docstring.

    ``data_root`` None writes ``num_images`` synthetic JPEGs of
    ``num_classes`` identities into a temporary folder (removed after);
    otherwise the first ``num_images`` images of the config's dataset
    there are decoded bare, and the loader runs over as many per round.
    """
    if num_workers not in (0, 1):
        raise ValueError(f'num_workers={num_workers}: the benchmark measures '
                         'one worker (1) or the loader in-process (0)')
    if rounds < 1 or num_images < 1:
        raise ValueError(f'rounds={rounds} and num_images={num_images} '
                         'must be >= 1')
    loader_cfg = train_loader_config(cfg, pipeline)
    with tempfile.TemporaryDirectory(prefix='mmpfc-data-') as tmp:
        if data_root is None:
            made = write_synthetic_faces(tmp, num_images, num_classes, seed)
            loader_cfg.dataset.update(
                data_root=tmp, ann_file='train.rec', idx_file=None,
                property_file='property', num_classes=made['num_classes'])
        else:
            loader_cfg.dataset.data_root = data_root
        result = _measure(loader_cfg, num_workers, rounds, num_images, seed)
    result.update(config=config_name, pipeline=pipeline,
                  data_root=data_root or '(synthetic)',
                  synthetic=data_root is None,
                  samples_per_sec=samples_per_sec)
    return DataSpeed(**result)


def _measure(loader_cfg: ConfigDict, num_workers: int, rounds: int,
             num_images: int, seed: int) -> dict:
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope('mmpfc')
    cv2.setNumThreads(0)  # one thread (inherited by the forked worker)
    torch.set_num_threads(1)
    loader_cfg.update(num_workers=num_workers, pin_memory=False,
                      persistent_workers=num_workers > 0)
    loader = Runner.build_dataloader(loader_cfg, seed=seed)
    dataset = loader.dataset
    count = min(num_images, len(dataset))
    blobs = [dataset.get_data_info(i)['img_bytes'] for i in range(count)]
    batches = max(1, round(count / loader.batch_size))
    timed = [_Timed(loader, batches)]
    if num_workers:
        timed.append(_Timed(torch.utils.data.DataLoader(
            _BareDecode(blobs), batch_size=loader.batch_size,
            num_workers=1, collate_fn=face_collate,
            persistent_workers=True), batches))
    decode_rates = []
    for _ in range(rounds):
        if num_workers:  # the workers refill their prefetch: not meanwhile
            time.sleep(SETTLE_SECONDS)
        decode_rates.append(_decode_rate(blobs))
        for loader_timing in timed:
            loader_timing.round()
    return dict(num_images=count, num_workers=num_workers,
                mean_bytes=float(np.mean([len(b) for b in blobs])),
                batch_size=loader.batch_size,
                pipeline_rates=timed[0].rates, decode_rates=decode_rates,
                worker_floor_rates=timed[1].rates if num_workers else [])


class _Timed:
    """Rounds of ``batches`` batches of one loader (its iterator kept),
    each after the batches its workers made while something else was
    timed."""

    def __init__(self, loader, batches: int) -> None:
        self.batches, self.rates = batches, []
        self.untimed = loader.prefetch_factor if loader.num_workers else 1
        self._loader, self._iter = loader, iter(loader)

    def round(self) -> None:
        for _ in range(self.untimed):
            self._next()
        start, images = time.perf_counter(), 0
        for _ in range(self.batches):
            images += len(self._next()['inputs'])
        self.rates.append(images / (time.perf_counter() - start))

    def _next(self) -> dict:
        batch = next(self._iter, None)
        if batch is None:  # an epoch of a finite sampler ended
            self._iter = iter(self._loader)
            batch = next(self._iter)
        return batch


class _BareDecode(torch.utils.data.Dataset):
    """The images' bytes decoded by ``cv2.imdecode`` and nothing else."""

    def __init__(self, blobs: List[bytes]) -> None:
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> dict:
        img = cv2.imdecode(np.frombuffer(self.blobs[index], np.uint8),
                           cv2.IMREAD_COLOR)
        return dict(img=img, gt_label=0)


def _decode_rate(blobs: List[bytes]) -> float:
    """Images/s of plain ``cv2.imdecode`` (BGR, what cv2 gives) of
    ``blobs``."""
    start = time.perf_counter()
    for data in blobs:
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return len(blobs) / (time.perf_counter() - start)


def describe(speed: DataSpeed) -> str:
    """The Markdown table and the workers line of a measurement."""
    where = 'in-process' if speed.num_workers == 0 else '1 worker'
    lines = [
        f'data: {speed.num_images} images ({speed.data_root}), '
        f'{speed.mean_bytes / 1000:.1f} KB per image, batch '
        f'{speed.batch_size}, {where}, 1 thread, best of '
        f'{len(speed.pipeline_rates)} rounds',
        '',
        '| what | images/s per worker | vs bare decode |',
        '|---|---|---|',
        f'| {speed.config or "config"} ({speed.pipeline} pipeline) | '
        f'{speed.pipeline_rate:,.0f} | {speed.ratio:.2f}x |',
        f'| bare `cv2.imdecode` of the same bytes | '
        f'{speed.decode_rate:,.0f} | 1.00x |',
    ]
    if speed.worker_floor_rate is not None:
        lines[-1:-1] = [
            f'| a worker that only decodes them and packs with '
            f'`face_collate` | {speed.worker_floor_rate:,.0f} | '
            f'{speed.worker_floor_rate / speed.decode_rate:.2f}x |']
        lines += ['', f'the pipeline delivers {speed.floor_ratio:.2f}x '
                  'what a worker that only decodes delivers; from that '
                  "worker to bare decoding is the DataLoader's own cost "
                  '(the shared-memory batch and its trip to the main '
                  'process)']
    if speed.samples_per_sec is not None:
        lines += ['', f'{speed.samples_per_sec:,.0f} samples/s per GPU need '
                  f'{speed.workers_needed} worker(s) per GPU '
                  f'({speed.samples_per_sec / speed.pipeline_rate:.2f} of '
                  'one worker at this rate; keep one spare for slower '
                  'disks and busier CPUs)']
    return '\n'.join(lines)
