"""PartialFCHead inside training: toy convergence on 1 and 2 ranks, gradient
accumulation, and an mmpretrain ImageClassifier config run by MMEngine."""
import os.path as osp

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_utils import run_distributed
from helpers import drawn_rows

NUM_CLASSES, IN_DIM, DIM, GLOBAL_BATCH, STEPS = 24, 32, 16, 16, 150
COSFACE = dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.0, m3=0.2)


def toy_batches():
    """A learnable problem: each class is a prototype plus noise."""
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(NUM_CLASSES, IN_DIM, generator=gen)
    for _ in range(STEPS):
        labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH, ), generator=gen)
        inputs = prototypes[labels] + 0.3 * torch.randn(
            GLOBAL_BATCH, IN_DIM, generator=gen)
        yield inputs, labels


def toy_training_worker(rank, world_size, sample_rate):
    import mmpfc  # noqa: F401
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    torch.manual_seed(0)
    backbone = nn.Linear(IN_DIM, DIM)
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=sample_rate,
                         loss=COSFACE, seed=11)
    full = torch.randn(NUM_CLASSES, DIM,
                       generator=torch.Generator().manual_seed(1)) * 0.01
    head.weight.data.copy_(full[head.class_start:head.class_start +
                                head.num_local])
    params = list(backbone.parameters()) + list(head.parameters())
    wrapper = PartialFCOptimWrapper(optimizer=torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=5e-4))
    per_rank = GLOBAL_BATCH // world_size
    losses = []
    for inputs, labels in toy_batches():
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = head.loss_by_labels(backbone(inputs[mine]), labels[mine])
        wrapper.backward(loss)
        if world_size > 1:  # what DDP does to replicated gradients
            for p in backbone.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
        wrapper.step()
        wrapper.zero_grad()
        losses.append(loss.item())
    return np.array(losses)


def test_model_parallel_trains_identically_on_1_and_2_ranks():
    one = run_distributed(toy_training_worker, 1, 1.0)[0]
    two = run_distributed(toy_training_worker, 2, 1.0)
    assert np.array_equal(two[0], two[1])  # same loss on both ranks
    assert one[-10:].mean() < 0.2 * one[:10].mean()
    np.testing.assert_allclose(two[0], one, rtol=2e-3, atol=1e-3)


def test_partial_fc_loss_falls_alike_on_1_and_2_ranks():
    one = run_distributed(toy_training_worker, 1, 0.5)[0]
    two = run_distributed(toy_training_worker, 2, 0.5)[0]
    for losses in (one, two):
        assert losses[-10:].mean() < 0.2 * losses[:10].mean()
    assert abs(np.log(one[-20:].mean() / two[-20:].mean())) < np.log(2.0)


def test_gradient_accumulation_sums_sampled_gradients():
    """Two micro-batches with different samples make one correct update."""
    import mmpfc  # noqa: F401
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.3, loss=COSFACE,
                         seed=2).double()
    lr, wd = 0.1, 5e-4
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                  weight_decay=wd),
        accumulative_counts=2)
    wrapper.initialize_count_status(head, 0, 2)
    drawn = drawn_rows(head)
    before = head.weight.detach().clone()
    feats = torch.randn(2, 4, DIM, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (2, 4))
    expected_grad = torch.zeros_like(before)
    for micro in range(2):
        loss = head.loss_by_labels(feats[micro], labels[micro])
        index = drawn[micro]
        # independent gradient of this micro-batch over its sampled rows
        ref = before[index].clone().requires_grad_(True)
        sub_labels = torch.searchsorted(index, labels[micro])
        cos = nn.functional.normalize(feats[micro]) @ \
            nn.functional.normalize(ref).t()
        onehot = nn.functional.one_hot(sub_labels, len(index)).bool()
        logits = 16.0 * torch.where(onehot, cos - 0.2, cos)
        (nn.functional.cross_entropy(logits, sub_labels) / 2).backward()
        expected_grad[index] += ref.grad
        wrapper.update_params(loss)
        if micro == 0:
            assert torch.equal(head.weight.detach(), before)
    touched = expected_grad.abs().sum(1) > 0
    expected = before - lr * (expected_grad + wd * before)
    after = head.weight.detach()
    assert torch.allclose(after[touched], expected[touched], atol=1e-12)
    assert torch.equal(after[~touched], before[~touched])


def write_image_folder(root, num_classes, per_class):
    import cv2
    rng = np.random.default_rng(0)
    for cls in range(num_classes):
        folder = osp.join(root, f'id{cls:03d}')
        import os
        os.makedirs(folder)
        base = rng.integers(0, 255, (32, 32), dtype=np.uint8)
        for i in range(per_class):
            noise = rng.integers(-20, 20, (32, 32))
            img = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
            cv2.imwrite(osp.join(folder, f'{i}.png'), img)


def test_mmpretrain_image_classifier_config_trains(tmp_path):
    """A plain mmpretrain config uses the head through custom_imports."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    data_root = str(tmp_path / 'faces')
    write_image_folder(data_root, num_classes=6, per_class=3)
    cfg = Config(dict(
        custom_imports=dict(imports=['mmpfc'], allow_failed_imports=False),
        default_scope='mmpretrain',
        model=dict(
            type='ImageClassifier',
            data_preprocessor=dict(mean=[127.5], std=[127.5]),
            backbone=dict(type='LeNet5'),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='mmpfc.PartialFCHead', num_classes=40,
                      in_channels=120, sample_rate=0.0,
                      loss=dict(type='CombinedMarginLoss', s=64.0, m2=0.5))),
        train_dataloader=dict(
            batch_size=6, num_workers=0,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(type='CustomDataset', data_root=data_root,
                         pipeline=[dict(type='LoadImageFromFile',
                                        color_type='grayscale'),
                                   dict(type='PackInputs')])),
        train_cfg=dict(by_epoch=False, max_iters=4),
        optim_wrapper=dict(type='mmpfc.PartialFCOptimWrapper',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                                          weight_decay=5e-4)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False,
                             begin=0, end=4),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=None),
        work_dir=str(tmp_path / 'work'),
        randomness=dict(seed=0)))
    runner = Runner.from_cfg(cfg)
    head = runner.model.head
    assert type(head).__module__ == 'mmpfc.models.heads.partial_fc_head'
    before = head.weight.detach().clone()
    runner.train()
    after = head.weight.detach()
    loss = runner.message_hub.get_scalar('train/loss').current()
    assert np.isfinite(loss) and loss > 0
    # sample_rate=0: positives only. The 6 identities present change; the
    # other 34 centers are never sampled and stay bit-identical.
    labels = {int(i) for i in range(6)}
    seen = torch.zeros(40, dtype=torch.bool)
    seen[sorted(labels)] = True
    assert torch.equal(after[~seen], before[~seen])
    assert not torch.equal(after[seen], before[seen])
    # the scheduler drives the head's lr like the backbone's: the group
    # that holds the head's centers and the backbone's group both end at
    # LinearLR's value after its 4 steps: 0.1 x (0.5 + 0.5 x 4 / 4)
    groups = runner.optim_wrapper.param_groups
    head_group, = [g for g in groups
                   if any(p is head.weight for p in g['params'])]
    backbone_group, = [g for g in groups if any(
        p is next(runner.model.backbone.parameters())
        for p in g['params'])]
    assert head_group['lr'] == pytest.approx(0.1 * (0.5 + 0.5 * 4 / 4))
    assert backbone_group['lr'] == pytest.approx(head_group['lr'])


def test_plain_optim_wrapper_with_sampled_head_refuses_the_next_step():
    """A stock wrapper's step leaves the sampled gradients unapplied: the
    head's next training step raises instead of training centers that
    never learn."""
    from mmengine.optim import OptimWrapper

    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5)
    wrapper = OptimWrapper(optimizer=torch.optim.SGD(head.parameters(),
                                                     lr=0.1))
    before = head.weight.detach().clone()
    wrapper.update_params(head.loss_by_labels(torch.randn(4, DIM),
                                              torch.arange(4)))
    assert torch.equal(head.weight, before)  # nothing was applied
    with torch.no_grad():  # evaluation is not a training step
        head.loss_by_labels(torch.randn(4, DIM), torch.arange(4))
    with pytest.raises(RuntimeError) as err:
        head.loss_by_labels(torch.randn(4, DIM), torch.arange(4))
    assert 'sample_rate=0.5' in str(err.value)
    assert "type='mmpfc.PartialFCOptimWrapper'" in str(err.value)


def test_accumulated_steps_wait_for_the_partial_fc_update():
    """With ``accumulative_counts=3`` the sampled gradients of three
    iterations, each calling the head twice (two views of a batch), wait
    for the update, which applies them: the centers change at every third
    iteration only."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5)
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
        accumulative_counts=3)
    wrapper.initialize_count_status(head, 0, 6)
    for step in range(6):
        before = head.weight.detach().clone()
        labels = torch.arange(4)
        loss = head.loss_by_labels(torch.randn(4, DIM), labels) + \
            head.loss_by_labels(torch.randn(4, DIM), labels)
        wrapper.update_params(loss)
        assert torch.equal(head.weight, before) == (step % 3 != 2)
