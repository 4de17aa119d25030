"""Importing insightface arcface_torch files (backbone + per-rank shards)."""
import os.path as osp

import pytest
import torch
from helpers import load_tool
from messages import assert_mentions
from tiny_training import build_runner, make_cfg

from mmpfc.checkpoint import CheckpointError, CheckpointRows, load_file
from mmpfc.checkpoint.insightface import find_insightface_files

CLASSES, DIM = 10, 16
#: arcface_torch's rows of 10 classes on 3 GPUs (the first 10 % 3 ranks
#: one more), written out
INSIGHTFACE_ROWS = ((0, 4), (4, 7), (7, 10))
#: the rows of each rank of a 4-rank run
FOUR_RANKS = ((0, 3), (3, 6), (6, 8), (8, 10))
BACKBONE = dict(type='MobileFaceNet', embedding_size=DIM, blocks=(1, 1, 1, 1),
                scale=1)


@pytest.fixture(scope='module')
def tool():
    return load_tool('model_converters', 'insightface2mmpfc.py').main


@pytest.fixture(scope='module')
def insightface_run(tmp_path_factory):
    """What arcface_torch leaves in its output folder after 3-GPU training."""
    folder = tmp_path_factory.mktemp('arcface_torch')
    runner = build_runner(make_cfg(folder / 'work', backbone=BACKBONE,
                                   dim=DIM))
    backbone = {k: torch.randn_like(v.float()).to(v.dtype)
                for k, v in runner.model.backbone.state_dict().items()}
    centers = torch.randn(CLASSES, DIM)
    torch.save(backbone, folder / 'model.pt')
    for rank, (start, stop) in enumerate(INSIGHTFACE_ROWS):
        rows = centers[start:stop].clone()
        torch.save({'weight': rows}, folder / f'softmax_fc_gpu_{rank}.pt')
        torch.save(dict(epoch=1, global_step=7,
                        state_dict_backbone={f'module.{k}': v
                                             for k, v in backbone.items()},
                        state_dict_softmax_fc={'weight': rows},
                        state_optimizer=dict(state={}, param_groups=[])),
                   folder / f'checkpoint_gpu_{rank}.pt')
    return folder, backbone, centers


@pytest.mark.parametrize('inputs', [
    ['model.pt', 'softmax_fc_gpu_0.pt', 'softmax_fc_gpu_1.pt',
     'softmax_fc_gpu_2.pt'],
    ['checkpoint_gpu_0.pt', 'checkpoint_gpu_1.pt', 'checkpoint_gpu_2.pt'],
])
def test_converted_files_load_on_any_world_size(tool, insightface_run,
                                                tmp_path, inputs):
    folder, backbone, centers = insightface_run
    out = str(tmp_path / 'converted.pth')
    assert tool([str(folder / n) for n in inputs] +
                [out, '--num-classes', str(CLASSES)]) == 0
    runner = build_runner(make_cfg(tmp_path / 'work', backbone=BACKBONE,
                                   dim=DIM))
    runner.load_checkpoint(out)
    assert torch.equal(runner.model.head.weight.detach(), centers)
    for key, value in backbone.items():
        assert torch.equal(runner.model.backbone.state_dict()[key], value)
    source = CheckpointRows(out, load_file(out))
    for start, stop in FOUR_RANKS:
        rows = source.take('head.weight', start, stop)[0]
        assert torch.equal(rows, centers[start:stop])


def test_backbone_only(tool, insightface_run, tmp_path, capsys):
    folder, backbone, _ = insightface_run
    out = str(tmp_path / 'backbone.pth')
    assert tool([str(folder / 'model.pt'), out]) == 0
    assert "prefix='backbone.'" in capsys.readouterr().out
    state = load_file(out)['state_dict']
    assert sorted(state) == sorted(f'backbone.{k}' for k in backbone)


def test_missing_rank_is_named(insightface_run, tmp_path, tool, capsys):
    folder, _, _ = insightface_run
    with pytest.raises(CheckpointError, match=r'missing: softmax_fc_gpu_1'):
        find_insightface_files([str(folder / 'model.pt'),
                                str(folder / 'softmax_fc_gpu_0.pt'),
                                str(folder / 'softmax_fc_gpu_2.pt')])
    args = [str(folder / 'model.pt'), str(folder / 'softmax_fc_gpu_0.pt'),
            str(folder / 'softmax_fc_gpu_1.pt'), str(tmp_path / 'o.pth')]
    assert tool(args + ['--num-classes', str(CLASSES)]) == 1
    # ranks 0 and 1 hold 4 + 3 rows
    assert_mentions(capsys.readouterr().err, '7 classes', 'num_classes=10')
    assert not osp.exists(tmp_path / 'o.pth')
    with pytest.raises(CheckpointError, match='shards of both kinds'):
        find_insightface_files([str(folder)])
