"""PartialFCRunner, its DDP wrapper and logging hooks on 2 gloo ranks.

One spawn runs two short trainings through MMEngine's Runner built from
``configs/_base_/default_runtime.py`` (Partial FC in fp32, then model
parallel with bf16 autocast and a clip that is always active), followed by
the bad-input checks, and returns what each rank saw.
"""
import glob
import json
import os.path as osp
import re

import pytest
import torch
import torch.nn as nn
from dist_utils import run_distributed
from helpers import ROOT
from messages import assert_in_order, assert_mentions
from mmengine.config import Config
from mmengine.hooks import Hook

import mmpfc  # noqa: F401
from mmpfc.engine.hooks import SpeedLogHook
from mmpfc.models.heads import PartialFCHead
from mmpfc.registry import HOOKS, MODELS, RUNNERS

NUM_CLASSES, DIM, BATCH, SAMPLES = 8, 16, 2, 16
INTERVAL, MAX_ITERS, SECONDS = 2, 4, 2.5
LOSS = dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.0, m3=0.2)
LINE = re.compile(
    r'Training: Speed (\d+\.\d{2}) samples/sec   Loss (\d+\.\d{4})   '
    r'LearningRate (\d+\.\d{4})   Epoch: (\d+)   Global Step: (\d+)   '
    r'Required: 0 hours$')


@MODELS.register_module(force=True)
class RunnerTinyNet(nn.Module):
    """conv-BN-ReLU, pool, linear: a backbone with buffers, ``(emb,)``."""

    def __init__(self, dim=DIM):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, dim)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return (self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)),)


@HOOKS.register_module(force=True)
class RunnerProbeHook(Hook):
    """Perturbs rank 1's replicated weights before init; records the run."""

    priority = 'VERY_LOW'

    def before_run(self, runner):
        model = runner.model.module
        self.shard_after_wrap = model.head.weight.detach().clone()
        if runner.rank == 1:  # _init_model_weights must undo this
            with torch.no_grad():
                model.backbone.fc.weight.add_(1.0)
                model.backbone.bn.running_mean.add_(1.0)
        self.losses, self.lrs, self.grad_norms = [], [], []

    def before_train(self, runner):
        model = runner.model.module
        self.shard_after_init = model.head.weight.detach().clone()
        self.backbone_after_init = {
            k: v.clone() for k, v in model.backbone.state_dict().items()}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        hub = runner.message_hub
        self.losses.append(float(outputs['loss']))
        self.lrs.append(hub.get_scalar('train/lr').current())
        self.grad_norms.append(hub.get_scalar('train/grad_norm').current())


class FakeClock:
    """Every call is ``SECONDS`` later than the previous one."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += SECONDS
        return self.now


def make_cfg(work_dir, name, sample_rate=0.5, amp=False, max_norm=5.0,
             **overrides):
    cfg = Config.fromfile(osp.join(ROOT, 'configs/_base_/default_runtime.py'))
    cfg.merge_from_dict(dict(
        experiment_name=name,
        work_dir=osp.join(work_dir, name),
        launcher='pytorch',
        model=dict(
            type='FaceRecognizer',
            backbone=dict(type='RunnerTinyNet'),
            head=dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                      in_channels=DIM, sample_rate=sample_rate, seed=5,
                      loss=LOSS)),
        train_dataloader=dict(
            batch_size=BATCH, num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(type='SyntheticFaceDataset',
                         num_classes=NUM_CLASSES, num_samples=SAMPLES,
                         image_size=16, learnable=True)),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
        optim_wrapper=dict(
            type='PartialFCAmpOptimWrapper' if amp else
            'PartialFCOptimWrapper',
            optimizer=dict(type='SGD', lr=0.2, momentum=0.9,
                           weight_decay=5e-4),
            clip_grad=dict(max_norm=max_norm)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5,
                             by_epoch=False, begin=0, end=MAX_ITERS),
        default_hooks=dict(logger=dict(interval=INTERVAL)),
        custom_hooks=[dict(type='SpeedLogHook'),
                      dict(type='MemoryTableHook', interval=MAX_ITERS),
                      dict(type='RunnerProbeHook')]))
    cfg.merge_from_dict(overrides)
    return cfg


def train_once(work_dir, name, head=None, **kwargs):
    cfg = make_cfg(work_dir, name, **kwargs)
    if head is not None:
        cfg.model.head = head
    runner = RUNNERS.build(cfg)
    speed = next(h for h in runner.hooks if isinstance(h, SpeedLogHook))
    speed.clock = FakeClock()
    probe = next(h for h in runner.hooks if isinstance(h, RunnerProbeHook))
    head = runner.model.module.head
    fresh = PartialFCHead(NUM_CLASSES, DIM, kwargs.get('sample_rate', 0.5),
                          loss=LOSS, seed=5)  # what this rank's shard was
    runner.train()
    model = runner.model.module
    return dict(
        wrapper=type(runner.model).__name__,
        ignored=sorted(runner.model.parameters_to_ignore),
        fresh_shard=fresh.weight.detach().clone(),
        shard_after_wrap=probe.shard_after_wrap,
        shard_after_init=probe.shard_after_init,
        shard_final=head.weight.detach().clone(),
        backbone_after_init=probe.backbone_after_init,
        backbone_final={k: v.clone()
                        for k, v in model.backbone.named_parameters()},
        losses=probe.losses, lrs=probe.lrs, grad_norms=probe.grad_norms,
        log_dir=runner.log_dir)


#: name -> (exception type, what the message names, in its order, config
#: overrides) of a bad set-up the runner must refuse before training
BAD_INPUT = {
    'bad_wrapper': (TypeError, (
        "'MMDistributedDataParallel'", "['head.weight']",
        'PartialFCDistributedDataParallel'), dict(
        model_wrapper_cfg=dict(type='MMDistributedDataParallel'))),
    'bad_classes': (ValueError, ('num_classes=8', 'num_classes=6'), dict(
        train_dataloader=dict(dataset=dict(num_classes=6)))),
    # 10 samples: 5 per rank, batches of 2 and a last one of 1
    'bad_batch': (ValueError, ('batch_size=2', '5 samples per rank',
                               'drop_last=True'),
                  dict(train_dataloader=dict(
                      sampler=dict(type='DefaultSampler'),
                      dataset=dict(num_samples=10)))),
    # 11 samples without round_up: 6 and 5, 3 and 2 batches
    'uneven_round_up': (
        ValueError, ('[6, 5]', 'round_up=False', 'batch_size=2', '[3, 2]'),
        dict(train_dataloader=dict(
            drop_last=True,
            sampler=dict(type='DefaultSampler', round_up=False),
            dataset=dict(num_samples=11)))),
    'collate_without_face_preprocessor': (
        ValueError, ('face_collate', 'FaceDataPreprocessor',
                     'ClsDataPreprocessor'), dict(
            model=dict(data_preprocessor=dict(
                type='mmpretrain.ClsDataPreprocessor')),
            train_dataloader=dict(
                collate_fn=dict(type='mmpfc.face_collate')))),
    # 5 samples per rank, fewer than one batch of 8
    'empty_loader': (ValueError, ('drop_last=True', 'batch_size=8',
                                  '5 samples per rank', 'no batch'), dict(
        train_dataloader=dict(batch_size=8, drop_last=True,
                              sampler=dict(type='DefaultSampler'),
                              dataset=dict(num_samples=10)))),
}


def outcome(work_dir, name, overrides):
    """``(exception type name, message)`` of a run, or None if it trained."""
    try:
        RUNNERS.build(make_cfg(work_dir, name, **overrides)).train()
    except Exception as err:  # noqa: B902  the test judges it
        return type(err).__name__, str(err)
    return None


def runner_worker(rank, world_size, work_dir):
    pfc = train_once(work_dir, 'pfc')
    mp = train_once(work_dir, 'mp', sample_rate=1.0, amp=True, max_norm=1e-3)
    dp = train_once(work_dir, 'dp', head=dict(
        type='MarginSoftmaxHead', num_classes=NUM_CLASSES, in_channels=DIM,
        loss=LOSS, seed=5))
    errors = {name: outcome(work_dir, name, overrides)
              for name, (_, _, overrides) in BAD_INPUT.items()}
    return dict(pfc=pfc, mp=mp, dp=dp, errors=errors)


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('runner'))
    return run_distributed(runner_worker, 2, work_dir)


@pytest.mark.parametrize('run', ['pfc', 'mp'])
def test_ddp_ignores_shards_and_replicates_backbone(ranks, run):
    r0, r1 = ranks[0][run], ranks[1][run]
    for r in (r0, r1):
        assert r['wrapper'] == 'PartialFCDistributedDataParallel'
        assert r['ignored'] == ['head.weight']
        # neither DDP's wrap nor the runner's weight init touched the shard
        assert torch.equal(r['shard_after_wrap'], r['fresh_shard'])
        assert torch.equal(r['shard_after_init'], r['fresh_shard'])
        assert not torch.equal(r['shard_final'], r['fresh_shard'])  # trained
    assert r0['shard_final'].shape == r1['shard_final'].shape == (4, DIM)
    assert not torch.allclose(r0['shard_after_init'], r1['shard_after_init'])
    assert not torch.allclose(r0['shard_final'], r1['shard_final'])
    # rank 1's perturbed replicated weights and buffers were re-broadcast
    for key, value in r0['backbone_after_init'].items():
        assert torch.equal(value, r1['backbone_after_init'][key]), key
    # and the backbone stayed identical through training
    for key, value in r0['backbone_final'].items():
        assert torch.equal(value, r1['backbone_final'][key]), key
        assert not torch.equal(value, r0['backbone_after_init'][key]), key
    assert r0['losses'] == r1['losses']  # the global loss on every rank


def test_data_parallel_head_is_replicated_by_the_same_wrapper(ranks):
    r0, r1 = ranks[0]['dp'], ranks[1]['dp']
    assert r0['wrapper'] == 'PartialFCDistributedDataParallel'
    assert r0['ignored'] == []
    assert r0['shard_final'].shape == (NUM_CLASSES, DIM)
    assert torch.equal(r0['shard_final'], r1['shard_final'])
    assert not torch.equal(r0['shard_final'], r0['shard_after_init'])
    for key, value in r0['backbone_final'].items():
        assert torch.equal(value, r1['backbone_final'][key]), key


def test_clip_norm_is_over_replicated_params_only(ranks):
    r0, r1 = ranks[0]['mp'], ranks[1]['mp']
    # max_norm=1e-3: clipping acts every step. Shard gradients differ by
    # rank; a norm including them would differ too and the backbones drift.
    assert r0['grad_norms'] == r1['grad_norms']
    assert min(r0['grad_norms']) > 1e-3


@pytest.mark.parametrize('run', ['pfc', 'mp'])
def test_speed_line_format_and_values(ranks, run):
    result = ranks[0][run]
    log_file, = glob.glob(osp.join(result['log_dir'], '*.log'))
    with open(log_file) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if 'Training: Speed' in line]
    assert len(lines) == MAX_ITERS // INTERVAL
    losses, lrs = result['losses'], result['lrs']
    for n, line in enumerate(lines, start=1):
        match = LINE.search(line)
        assert match, line
        speed, loss, lr = (float(v) for v in match.groups()[:3])
        epoch, step = (int(v) for v in match.groups()[3:])
        assert step == n * INTERVAL
        # interval x per-rank batch x world size / seconds of the interval
        assert speed == pytest.approx(INTERVAL * BATCH * 2 / SECONDS,
                                      abs=0.005)
        window = losses[step - INTERVAL:step]
        assert loss == pytest.approx(sum(window) / INTERVAL, abs=1e-4)
        assert lr == pytest.approx(lrs[step - 1], abs=1e-4)
        assert epoch == step * BATCH * 2 // SAMPLES
    # MMEngine's own line and the JSON scalars carry the same speed
    assert re.search(r'Iter\(train\) \[2/4\].*speed: 3\.2000', text)
    with open(osp.join(result['log_dir'], 'vis_data', 'scalars.json')) as f:
        scalars = [json.loads(line) for line in f]
    assert [s['speed'] for s in scalars if 'speed' in s] == [3.2, 3.2]
    # the memory table: one row per rank, gathered to rank 0
    assert re.search(r'Memory per rank after step 2, process RSS', text)
    rows = re.findall(r'^\[(\d)\] .*\| +(\d+) / +(\d+) MB \| peak +(\d+) MB',
                      text, re.M)
    assert sorted({row[0] for row in rows}) == ['0', '1']
    assert all(0 < int(used) < int(total) for _, used, total, _ in rows)


@pytest.mark.parametrize('name', sorted(BAD_INPUT))
def test_bad_input_errors_name_the_values(ranks, name):
    error, named, _ = BAD_INPUT[name]
    for rank in ranks:  # every rank refuses, with the same message
        assert rank['errors'][name] is not None, f'{name} trained'
        kind, message = rank['errors'][name]
        assert kind == error.__name__, message
        assert_in_order(message, *named)  # each value in its place
    assert ranks[0]['errors'][name] == ranks[1]['errors'][name]


def test_launcher_without_process_group(monkeypatch, tmp_path):
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    cfg = make_cfg(str(tmp_path), 'no_group')
    with pytest.raises(RuntimeError) as err:
        RUNNERS.build(cfg)
    assert_mentions(err, "launcher='pytorch'", 'process group')


def test_published_checkpoint_is_written_at_the_end(tmp_path):
    """MMEngine's CheckpointHook loads the last checkpoint back to publish
    it (``published_keys``): a plain ``torch.load`` inside the run, which
    reads MMEngine's message hub objects."""
    from tiny_training import build_runner, make_cfg
    cfg = make_cfg(tmp_path, max_iters=2, interval=2)
    cfg.default_hooks.checkpoint.published_keys = ['meta', 'state_dict']
    build_runner(cfg).train()
    published, = glob.glob(osp.join(str(tmp_path), 'iter_2-*.pth'))
    saved = torch.load(published, weights_only=False)
    assert sorted(saved) == ['meta', 'state_dict']
    assert any(k.startswith('backbone.') for k in saved['state_dict'])
    # the replicated part only (merge_checkpoint.py makes a whole file)
    assert 'head.weight' not in saved['state_dict']


@pytest.mark.parametrize('sample_rate,center_dtype,refused', [
    (0.5, 'float32', True),  # sampled centers: rows applied by the wrapper
    (1.0, 'bfloat16', True),  # a 16-bit shard: the same
    (1.0, 'float32', False)])  # model parallel fp32: a dense weight.grad
def test_runner_refuses_a_stock_wrapper_for_row_updates(
        tmp_path, sample_rate, center_dtype, refused):
    from tiny_training import build_runner, make_cfg
    cfg = make_cfg(tmp_path, sample_rate=sample_rate,
                   center_dtype=center_dtype)
    runner = build_runner(cfg)
    stock = dict(type='OptimWrapper',
                 optimizer=dict(type='SGD', lr=0.1, momentum=0.9))
    if not refused:
        assert type(runner.build_optim_wrapper(stock)).__name__ == \
            'OptimWrapper'
        return
    with pytest.raises(ValueError) as err:
        runner.build_optim_wrapper(stock)
    assert_mentions(err, 'head.weight', 'optim_wrapper (OptimWrapper)',
                    "type='mmpfc.PartialFCOptimWrapper'")


def test_row_update_check_names_the_wrapper_of_an_optim_wrapper_dict():
    from mmengine.optim import OptimWrapper, OptimWrapperDict

    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.engine.runners.partial_fc_runner import check_row_updates
    model = nn.Module()
    model.backbone = nn.Linear(4, 4)
    model.head = PartialFCHead(num_classes=10, in_channels=4,
                               sample_rate=0.5)

    def wrappers(head_type):
        return OptimWrapperDict(
            backbone=OptimWrapper(torch.optim.SGD(
                model.backbone.parameters(), lr=0.1)),
            head=head_type(optimizer=torch.optim.SGD(
                model.head.parameters(), lr=0.1)))

    check_row_updates(model, wrappers(PartialFCOptimWrapper))  # accepted
    with pytest.raises(ValueError) as err:
        check_row_updates(model, wrappers(OptimWrapper))
    assert_mentions(err, 'head.weight', "optim_wrapper['head']",
                    '(OptimWrapper)')


@pytest.mark.parametrize('persistent', [True, False])
def test_train_loader_workers_stop_when_train_ends(tmp_path, persistent):
    """Left to the interpreter's exit, torch reports terminated workers as
    a traceback after a run that went well: they are joined as train
    returns."""
    import multiprocessing

    from tiny_training import build_runner, make_cfg
    cfg = make_cfg(tmp_path, max_iters=2, interval=2)
    cfg.train_dataloader.update(num_workers=2, persistent_workers=persistent)
    before = {p.pid for p in multiprocessing.active_children()}
    runner = build_runner(cfg)
    runner.train()
    assert runner.iter == 2
    assert {p.pid for p in multiprocessing.active_children()} <= before
    assert runner.train_dataloader._iterator is None


def test_label_check_of_the_last_step_is_read_when_train_ends(
        tmp_path, monkeypatch):
    """On CUDA a step's label range check is read at the next step: the
    last step's is read as train returns (a spy stands for the check)."""
    from tiny_training import build_runner, make_cfg

    from mmpfc.models.heads import PartialFCHead
    read = []
    monkeypatch.setattr(PartialFCHead, 'check_pending_labels',
                        lambda self: read.append(self.num_classes))
    build_runner(make_cfg(tmp_path, max_iters=2, interval=2)).train()
    assert read == [10]
