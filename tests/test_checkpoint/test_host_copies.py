"""Rank 0 lends the host copy of its shard to the main file: the model's
state dict gives it during the write only."""
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


def test_state_dict_gives_the_lent_copy_during_the_write_only():
    from mmpfc.checkpoint.host_copies import lend_host_copies
    model, _ = trained_head()
    weight_copy = model.head.weight.detach().clone()
    payload = dict(params={'head.weight': dict(weight=weight_copy,
                                               rows={})})
    with lend_host_copies(model, payload):
        # what MMEngine's Runner.save_checkpoint calls for the main file
        state = weights_to_cpu(get_state_dict(model))
        assert state['head.weight'] is weight_copy
        assert torch.equal(state['backbone.weight'], model.backbone.weight)
        assert model.state_dict()['head.weight'] is weight_copy
        # a caller asking for the parameters gets them
        assert model.state_dict(keep_vars=True)['head.weight'] is \
            model.head.weight
    assert model.state_dict()['head.weight'] is not weight_copy


def test_hooks_are_removed_when_the_write_fails():
    from mmpfc.checkpoint.host_copies import lend_host_copies
    model, _ = trained_head()
    copy = model.head.weight.detach().clone()
    payload = dict(params={'head.weight': dict(weight=copy, rows={})})
    with pytest.raises(OSError, match='disk full'):  # passed on, not kept
        with lend_host_copies(model, payload):
            raise OSError('disk full')
    assert model.state_dict()['head.weight'] is not copy


def test_a_sharded_save_lends_its_shard_copy_to_the_main_file(
        tmp_path, monkeypatch):
    """``ShardedCheckpointer.save`` writes the main file within the lending
    of the very payload it wrote to the shard file."""
    from mmengine.runner.checkpoint import get_state_dict

    from mmpfc.checkpoint import ShardedCheckpointer
    from mmpfc.checkpoint import checkpointer as checkpointer_module
    from mmpfc.checkpoint import host_copies
    model, wrapper = trained_head()
    lent = []

    def recording_lend(model, payload):
        lent.append(payload['params']['head.weight']['weight'])
        return host_copies.lend_host_copies(model, payload)

    monkeypatch.setattr(checkpointer_module, 'lend_host_copies',
                        recording_lend)
    seen = []

    def write_main(name, manifest):
        state = get_state_dict(model)
        seen.append(state['head.weight'])
        torch.save(dict(state_dict=state), tmp_path / name)

    ShardedCheckpointer().save(model, wrapper, str(tmp_path), 'iter_1.pth',
                               write_main)
    assert len(lent) == 1 and seen[0] is lent[0]
    shard, = tmp_path.glob('iter_1.pth.shards-*/rank0-of1.pth')
    saved = torch.load(shard, weights_only=False)
    assert torch.equal(saved['params']['head.weight']['weight'], lent[0])
    assert model.state_dict()['head.weight'] is not lent[0]  # after it
