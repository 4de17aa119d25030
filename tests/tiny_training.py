"""The tiny training set-up many tests share: a LeNet-5 face model with a
sharded head on a synthetic in-memory dataset, trained by ``PartialFCRunner``
on the CPU (``make_cfg`` / ``build_runner``), and what they inspect of it."""
import glob
import os.path as osp
import re

import torch
from mmengine.hooks import Hook

import mmpfc  # noqa: F401
from mmpfc.registry import DATASETS, HOOKS, MODELS, RUNNERS

NUM_CLASSES, GLOBAL_BATCH, DIM = 10, 6, 120
#: The tiny run's margin unless ``make_cfg(loss=...)`` says otherwise.
DEFAULT_LOSS = dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.0,
                    m3=0.2)


@DATASETS.register_module(force=True)
class CkptTinyFaces(torch.utils.data.Dataset):
    """Grey 32x32 'faces': a prototype per class plus per-index noise."""

    def __init__(self, num_classes=NUM_CLASSES, size=60):
        gen = torch.Generator().manual_seed(0)
        self.prototypes = torch.rand(num_classes, 1, 32, 32, generator=gen)
        self.num_classes, self.size = num_classes, size
        self.metainfo = dict(classes=[str(i) for i in range(num_classes)])

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        from mmpretrain.structures import DataSample
        label = index % self.num_classes
        noise = torch.rand(1, 32, 32,
                           generator=torch.Generator().manual_seed(index))
        image = (0.7 * self.prototypes[label] + 0.3 * noise) * 255
        return dict(inputs=image.to(torch.uint8),
                    data_samples=DataSample().set_gt_label(label))


@HOOKS.register_module(force=True)
class CkptCaptureHook(Hook):
    """Keeps the head's rows and momentum as training starts (after load)."""

    def before_train(self, runner):
        runner.captured = head_state(runner)


@MODELS.register_module(force=True)
class GapDropoutNeck(torch.nn.Module):
    """Global average pooling, then dropout: a model that draws random
    numbers every step (what exact resume must reproduce)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.dropout = torch.nn.Dropout(p)

    def forward(self, inputs):
        return tuple(self.dropout(x.mean(dim=(2, 3))) for x in inputs)


def head_state(runner) -> dict:
    """Shard rows, their momentum, backbone weights, sampler state."""
    model = getattr(runner.model, 'module', runner.model)
    head = model.head
    state = runner.optim_wrapper.optimizer.state.get(head.weight, {})
    momentum = state.get('momentum_buffer')
    return dict(
        class_start=head.class_start, weight=head.weight.detach().clone(),
        momentum=None if momentum is None else momentum.clone(),
        optimizer_state={k: v.clone() for k, v in state.items()
                         if torch.is_tensor(v)},
        backbone={k: v.clone()
                  for k, v in model.backbone.state_dict().items()},
        sampler=head.sampler.state_dict(), iter=runner.iter,
        rounding=None if head.rounding is None else
        head.rounding.state_dict())


def make_cfg(work_dir, world_size=1, max_iters=4, sample_rate=0.5,
             load_from=None, resume=False, interval=2, max_keep_ckpts=-1,
             num_classes=NUM_CLASSES, backbone=None, dim=DIM,
             optimizer=None, neck=None, center_dtype='float32',
             center_state_dtype='float32', loss=None):
    """Config of the tiny training run (dict for ``Runner.from_cfg``);
    ``loss``: the head's margin config (None: :data:`DEFAULT_LOSS`)."""
    from mmengine.config import Config
    return Config(dict(
        runner_type='PartialFCRunner',
        default_scope='mmpfc',
        model=dict(
            type='FaceRecognizer',
            data_preprocessor=dict(mean=[127.5], std=[127.5]),
            backbone=backbone or dict(type='mmpretrain.LeNet5'),
            neck=neck or dict(type='mmpretrain.GlobalAveragePooling'),
            head=dict(type='PartialFCHead', num_classes=num_classes,
                      in_channels=dim, sample_rate=sample_rate, seed=5,
                      center_dtype=center_dtype,
                      loss=dict(DEFAULT_LOSS if loss is None else loss))),
        train_dataloader=dict(
            batch_size=GLOBAL_BATCH // world_size, num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
            dataset=dict(type='CkptTinyFaces', num_classes=num_classes)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(type='PartialFCOptimWrapper',
                           optimizer=optimizer or dict(
                               type='SGD', lr=0.2, momentum=0.9,
                               weight_decay=5e-4),
                           clip_grad=dict(max_norm=5),
                           center_state_dtype=center_state_dtype),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
                 end=3),
            dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False,
                 begin=3, end=24)],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', by_epoch=False,
                            interval=interval, max_keep_ckpts=max_keep_ckpts),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='CkptCaptureHook')],
        launcher='pytorch' if world_size > 1 else 'none',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        randomness=dict(seed=0),
        log_level='WARNING',
        work_dir=str(work_dir), load_from=load_from, resume=resume))


def build_runner(cfg):
    return RUNNERS.build(cfg)


def train_worker(rank, world_size, work_dir, kwargs, also_load=None):
    """Train the tiny run of ``make_cfg(**kwargs)``; the head's state as
    training started (after any load) and at the end."""
    runner = build_runner(make_cfg(work_dir, world_size=world_size,
                                   **kwargs))
    runner.train()
    result = dict(start=runner.captured, final=head_state(runner))
    if also_load is not None:  # e.g. a merged checkpoint
        runner.load_checkpoint(also_load)
        result['loaded'] = head_state(runner)
    return result


def shard_dirs(folder):
    return sorted(osp.basename(p) for p in glob.glob(
        osp.join(folder, '*.shards-*')))


#: A shard folder's name: its main file's, ``.shards-``, then the token of
#: the save (12 lowercase hex digits).
SHARD_DIR = re.compile(r'(?P<main>.+\.pth)\.shards-(?P<token>[0-9a-f]{12})')


def check_shard_dirs(folder, mains):
    """Assert that ``folder`` holds exactly one shard folder per main file
    of ``mains``, named ``<main>.shards-<token>`` with a token of 12 hex
    digits, the one its main file's manifest records (and a new one per
    save); returns the folders' names."""
    from mmpfc.checkpoint import load_file
    names = shard_dirs(folder)
    found = [SHARD_DIR.fullmatch(name) for name in names]
    assert all(found), names
    assert sorted(m['main'] for m in found) == sorted(mains), names
    for match in found:
        manifest = load_file(osp.join(str(folder), match['main']))['meta'][
            'mmpfc']
        assert manifest['token'] == match['token'], (manifest, match[0])
        assert manifest['shard_dir'] == match[0]
    tokens = [m['token'] for m in found]
    assert len(set(tokens)) == len(tokens), tokens
    return names


def calibrate_bn(model, shape=(8, 3, 112, 112)):
    """Give an untrained model the BN statistics of real inputs, so its
    embeddings have trained-like magnitudes (not 1e7)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model.extract_feat(torch.rand(shape) * 2 - 1)
    return model.eval()
