"""A sharded head refuses a DDP that would replicate its rows, and the
README's mmpretrain snippet (run as written, on 2 gloo ranks) keeps every
rank's rows in training and in the checkpoint."""
import glob
import os.path as osp
import re

import pytest
import torch
import torch.nn as nn
from dist_utils import run_distributed
from helpers import ROOT
from messages import assert_mentions
from tiny_training import check_shard_dirs

import mmpfc  # noqa: F401
from mmpfc.models.heads import PartialFCHead


class HeadOnly(nn.Module):
    """A linear 'backbone' and a sharded head: ``forward`` is the loss."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.head = PartialFCHead(10, 8, sample_rate=1.0, seed=3)

    def forward(self, x, labels):
        return self.head.loss_by_labels(self.backbone(x), labels)


def wrapped_forward(rank, world_size, wrapper):
    from mmengine.model import MMDistributedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    from mmpfc.engine.model_wrappers import PartialFCDistributedDataParallel
    model = HeadOnly()
    own_rows = model.head.weight.detach().clone()
    cls = dict(ddp=DistributedDataParallel, mmddp=MMDistributedDataParallel,
               pfc=PartialFCDistributedDataParallel)[wrapper]
    ddp = cls(model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
    try:
        loss = ddp(x, torch.arange(4) + 2 * rank)
    except RuntimeError as err:
        return dict(error=str(err))
    loss.backward()
    return dict(loss=float(loss), rows_kept=torch.equal(
        model.head.weight.detach(), own_rows))


@pytest.mark.parametrize('wrapper', ['ddp', 'mmddp'])
def test_replicating_ddp_is_refused_at_the_first_forward(wrapper):
    results = run_distributed(wrapped_forward, 2, wrapper)
    for result in results:  # every rank refuses, with the fix
        assert_mentions(
            result['error'], "['head.weight']", 'rank-local',
            "runner_type = 'mmpfc.PartialFCRunner'",
            "model_wrapper_cfg = dict(type='mmpfc.PartialFCDistributed"
            "DataParallel')")


def test_shard_aware_ddp_runs():
    results = run_distributed(wrapped_forward, 2, 'pfc')
    assert all(r['rows_kept'] for r in results)
    assert results[0]['loss'] == pytest.approx(results[1]['loss'])


def checked_then_rewrapped(rank, world_size):
    """A head checked under a shard-aware DDP, copied, then moved into
    another model that a plain DDP wraps once the first DDP is gone."""
    import gc
    import pickle

    from torch.nn.parallel import DistributedDataParallel

    from mmpfc.engine.model_wrappers import PartialFCDistributedDataParallel
    model = HeadOnly()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
    first = PartialFCDistributedDataParallel(model)
    first(x, torch.arange(4)).backward()
    copy = pickle.loads(pickle.dumps(model.head))
    del first
    gc.collect()
    other = HeadOnly()
    other.head = model.head
    try:
        DistributedDataParallel(other)(x, torch.arange(4))
    except RuntimeError as err:
        return dict(error=str(err), copy_rows=copy.weight.shape[0])
    return dict(error=None, copy_rows=copy.weight.shape[0])


def test_a_new_ddp_is_checked_again_and_a_checked_head_still_copies():
    for result in run_distributed(checked_then_rewrapped, 2):
        assert result['copy_rows'] == 5  # 10 classes over 2 ranks
        assert_mentions(result['error'], "['head.weight']", 'rank-local')


# ------------------------------------------------ the README, as written
def readme_snippet() -> str:
    with open(osp.join(ROOT, 'README.md')) as f:
        text = f.read()
    after = text.split('From another OpenMMLab project', 1)[1]
    return re.search(r'```python\n(.*?)```', after, re.S).group(1)


def train_readme_config(rank, world_size, work_dir):
    import tiny_training  # noqa: F401  (registers CkptTinyFaces)
    from mmengine.config import Config
    from mmpretrain.registry import RUNNERS
    snippet = readme_snippet().replace('dict(...)', 'dict()')
    cfg = Config.fromstring(snippet, '.py')
    cfg.merge_from_dict(dict(
        default_scope='mmpretrain',
        model=dict(
            data_preprocessor=dict(mean=[127.5], std=[127.5]),
            backbone=dict(type='LeNet5'),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(num_classes=10, in_channels=120)),
        train_dataloader=dict(
            batch_size=3, num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(type='mmpfc.CkptTinyFaces')),
        train_cfg=dict(by_epoch=False, max_iters=2),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           by_epoch=False, interval=2)),
        launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')),
        log_level='WARNING', work_dir=work_dir, randomness=dict(seed=0)))
    runner = RUNNERS.build(cfg)  # as mmpretrain's tools/train.py does
    runner.train()
    return dict(runner=type(runner).__name__,
                wrapper=type(runner.model).__name__,
                rows=runner.model.module.head.weight.detach().clone())


def test_readme_mmpretrain_snippet_keeps_every_ranks_rows(tmp_path):
    snippet = readme_snippet()
    assert "runner_type = 'mmpfc.PartialFCRunner'" in snippet
    results = run_distributed(train_readme_config, 2, str(tmp_path))
    assert results[0]['runner'] == 'PartialFCRunner'
    assert results[0]['wrapper'] == 'PartialFCDistributedDataParallel'
    assert not torch.equal(results[0]['rows'], results[1]['rows'])
    folder, = check_shard_dirs(tmp_path, ['iter_2.pth'])
    shards = sorted(osp.basename(p) for p in glob.glob(
        osp.join(str(tmp_path), folder, '*.pth')))
    assert shards == ['rank0-of2.pth', 'rank1-of2.pth']
    saved = torch.load(osp.join(str(tmp_path), folder, 'rank1-of2.pth'),
                       weights_only=False)
    assert any(torch.equal(t, results[1]['rows'])
               for t in _tensors(saved))


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
