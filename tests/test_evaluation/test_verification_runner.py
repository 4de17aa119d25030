"""Dataset configs end to end: train from a record file with 2 workers,
validate on three .bin sets, log the accuracies, keep the best checkpoint."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from face_files import converter, make_faces
from helpers import ROOT
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.runner import Runner

from mmpfc.registry import DATASETS

SETS = ('lfw', 'cfp_fp', 'agedb_30')


class ToyFaceModel(BaseModel):
    """Linear embedding + classifier; ``predict`` sets ``raw_feat`` and
    ``pred_feat`` (normalized) like ``PartialFCHead.predict``. The face
    models' preprocessor, which takes the lean pipeline's label tensor (the
    dataset config's default) as well as data samples."""

    def __init__(self, num_classes: int, size: int = 12) -> None:
        super().__init__(data_preprocessor=dict(
            type='mmpfc.FaceDataPreprocessor', mean=[127.5] * 3,
            std=[127.5] * 3))
        self.embed = nn.Linear(3 * size * size, 8)
        self.cls = nn.Linear(8, num_classes)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        feats = self.embed(inputs.flatten(1))
        if mode == 'loss':
            labels = torch.cat([s.gt_label for s in data_samples])
            return dict(loss=F.cross_entropy(self.cls(feats), labels))
        if mode == 'predict':
            for sample, feat in zip(data_samples, feats):
                sample.set_field(feat, 'raw_feat')
                sample.set_field(F.normalize(feat, dim=0), 'pred_feat')
            return data_samples
        return feats


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('ms1m')
    files = list(make_faces(str(root / 'faces'), counts=(4, 4, 4)))
    converter('folder2rec').main([str(root / 'faces'), str(root)])
    pairs2bin = converter('pairs2bin')
    for shift, name in enumerate(SETS):
        lines = [f'{files[p]} {files[(p + 1 + shift) % 12]} {p % 2}\n'
                 for p in range(10)]
        (root / f'{name}.txt').write_text(''.join(lines))
        pairs2bin.main([str(root / f'{name}.txt'), str(root / f'{name}.bin')])
    return str(root)


def test_configs_carry_the_dataset_counts():
    """Identities and images of each training set, the ``num_classes`` and
    ``num_image`` of insightface's arcface_torch configs."""
    counts = dict(ms1mv2=(85742, 5822653), ms1mv3=(93431, 5179510),
                  glint360k=(360232, 17091657),
                  webface42m=(2059906, 42474557))
    for name, (classes, images) in counts.items():
        cfg = Config.fromfile(
            os.path.join(ROOT, 'configs/_base_/datasets', f'{name}.py'))
        assert (cfg.num_classes, cfg.num_image) == (classes, images)
        dataset = cfg.train_dataloader.dataset
        assert dataset.num_classes == classes
        assert dataset.data_root == cfg.data_root
        assert cfg.val_dataloader.dataset.data_root == cfg.data_root
        assert cfg.test_dataloader.dataset.data_root == cfg.data_root
        assert cfg.train_dataloader.sampler.type == 'InfiniteSampler'


def test_train_and_validate_from_configs(data_root, tmp_path):
    cfg = Config.fromfile(
        os.path.join(ROOT, 'configs/_base_/datasets/ms1mv3.py'))
    train = cfg.train_dataloader
    train.update(batch_size=4, num_workers=2)
    train.dataset.update(data_root=data_root)
    with pytest.raises(ValueError, match=r'num_classes=93431 .* says 3'):
        DATASETS.build(train.dataset)
    train.dataset.num_classes = 3
    val = cfg.val_dataloader
    val.update(batch_size=8, num_workers=0)
    val.dataset.update(data_root=data_root)
    runner = Runner(
        model=ToyFaceModel(num_classes=3), work_dir=str(tmp_path),
        train_dataloader=train, val_dataloader=val,
        val_evaluator=cfg.val_evaluator, val_cfg=cfg.val_cfg,
        train_cfg=dict(by_epoch=False, max_iters=4, val_interval=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(
            logger=dict(type='LoggerHook', interval=1,
                        log_metric_by_epoch=False),
            checkpoint=dict(type='CheckpointHook', interval=100,
                            by_epoch=False, save_best='mean_accuracy',
                            rule='greater')),
        visualizer=dict(type='Visualizer', vis_backends=[
            dict(type='LocalVisBackend'),
            dict(type='TensorboardVisBackend')]),
        default_scope='mmpfc', log_level='WARNING')
    runner.train()
    scalars = [json.loads(line) for line in open(
        os.path.join(runner.log_dir, 'vis_data', 'scalars.json'))]
    val_rows = [row for row in scalars if 'mean_accuracy' in row]
    assert [row['step'] for row in val_rows] == [2, 4]
    for name in SETS:
        assert 0 <= val_rows[-1][f'{name}/accuracy'] <= 1
        assert val_rows[-1][f'{name}/xnorm'] > 0
    assert any(f.startswith('best_mean_accuracy')
               for f in os.listdir(tmp_path))
    # TensorBoard gets the same validation scalars, at the same steps
    from tensorboard.backend.event_processing.event_accumulator import \
        EventAccumulator
    events = EventAccumulator(
        os.path.join(runner.log_dir, 'vis_data')).Reload()
    for key in ('mean_accuracy', 'lfw/accuracy', 'agedb_30/xnorm'):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [row['step'] for row in val_rows]
        assert [e.value for e in logged] == pytest.approx(
            [row[key] for row in val_rows], rel=1e-6)  # float32 in events
    # stop the workers now (at pytest's exit, gc joins them for 10 s)
    runner.train_loop.dataloader_iterator._iterator._shutdown_workers()
