"""Rank 0 lends the host copies of its shard file to the main file: the
model's and the optimizer's state dicts give them during the write only."""
import pytest
import torch
import torch.nn as nn
from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu


def trained_head():
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    model = nn.Module()
    model.backbone = nn.Linear(4, 4)
    model.head = PartialFCHead(num_classes=20, in_channels=4)
    wrapper = PartialFCOptimWrapper(optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9))
    wrapper.update_params(model.head.loss_by_labels(
        model.backbone(torch.randn(3, 4)), torch.tensor([1, 2, 3])))
    return model, wrapper


def test_state_dicts_give_the_lent_copies_during_the_write_only():
    from mmpfc.checkpoint.host_copies import lend_host_copies
    model, wrapper = trained_head()
    momentum = wrapper.optimizer.state[model.head.weight]['momentum_buffer']
    weight_copy = model.head.weight.detach().clone()
    momentum_copy = momentum.clone()
    payload = dict(params={'head.weight': dict(
        weight=weight_copy, rows=dict(momentum_buffer=momentum_copy))})
    # head.weight is the optimizer's third parameter (after the Linear's 2)
    with lend_host_copies(model, wrapper, payload):
        # what MMEngine's Runner.save_checkpoint calls for the main file
        state = weights_to_cpu(get_state_dict(model))
        assert state['head.weight'] is weight_copy
        assert state['backbone.weight'] is not None
        assert model.state_dict()['head.weight'] is weight_copy
        optimizer_state = wrapper.state_dict()['state']
        assert optimizer_state[2]['momentum_buffer'] is momentum_copy
        assert torch.equal(optimizer_state[0]['momentum_buffer'],
                           wrapper.optimizer.state[
                               model.backbone.weight]['momentum_buffer'])
    # the live state was never replaced, and the hooks are gone
    assert wrapper.optimizer.state[model.head.weight][
        'momentum_buffer'] is momentum
    assert model.state_dict()['head.weight'] is not weight_copy
    assert wrapper.state_dict()['state'][2]['momentum_buffer'] is momentum


def test_hooks_are_removed_when_the_write_fails():
    from mmpfc.checkpoint.host_copies import lend_host_copies
    model, wrapper = trained_head()
    copy = model.head.weight.detach().clone()
    payload = dict(params={'head.weight': dict(weight=copy, rows={})})
    with pytest.raises(OSError, match='disk full'):  # passed on, not kept
        with lend_host_copies(model, wrapper, payload):
            raise OSError('disk full')
    assert model.state_dict()['head.weight'] is not copy
