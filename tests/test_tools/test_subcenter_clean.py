"""tools/subcenter_clean.py on a tiny sub-center ArcFace model.

A linear model with K=3 sub-centers per class is trained for a few steps on
the tiny faces of ``tests/tiny_training.py``, two of whose samples carry a
wrong label. The tool's report is compared with a computation written here
(embeddings from the model's modules, the preprocessing written out,
counting in Python), on the sharded checkpoint of the run, and on a merged
checkpoint whose sub-centers are set by hand so that the answer is known:
exactly the two mislabelled samples sit nearer a non-dominant sub-center.
``--list`` (image files) gives the same report as the dataset.
"""
import json
import math
from collections import Counter

import cv2
import pytest
import torch
import torch.nn.functional as F
from helpers import load_tool
from tiny_training import NUM_CLASSES, CkptTinyFaces, build_runner, make_cfg

from mmpfc.checkpoint import atomic_save, load_file
from mmpfc.checkpoint.merge import merge_checkpoint
from mmpfc.registry import DATASETS, MODELS

K, DIM = 3, 16
NOISY = {7: 3, 26: 1}  # index -> wrong label (the true one is index % 10)


@DATASETS.register_module(force=True)
class NoisyTinyFaces(CkptTinyFaces):
    """The tiny faces in 3 channels, some with a wrong label."""

    def __init__(self, num_classes=NUM_CLASSES, size=60, noisy=()):
        super().__init__(num_classes, size)
        self.noisy = {int(i): int(label) for i, label in noisy}

    def __getitem__(self, index):
        item = super().__getitem__(index)
        item['inputs'] = item['inputs'].expand(3, -1, -1).contiguous()
        if index in self.noisy:
            item['data_samples'].set_gt_label(self.noisy[index])
        return item

    def label(self, index):
        return self.noisy.get(index, index % self.num_classes)


@MODELS.register_module(force=True)
class CleanToyNet(torch.nn.Module):
    """A linear map of the whole 3x32x32 image."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 32)

    def forward(self, inputs):
        return (self.conv(inputs), )


@pytest.fixture(scope='module')
def tool():
    return load_tool('subcenter_clean.py').main


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Config file, sharded checkpoint, embeddings (N, D) and the labels."""
    work_dir = tmp_path_factory.mktemp('clean')
    cfg = make_cfg(work_dir, max_iters=20, interval=20, sample_rate=1.0,
                   backbone=dict(type='CleanToyNet'), dim=DIM)
    cfg.model.data_preprocessor = dict(mean=[127.5] * 3, std=[127.5] * 3)
    cfg.model.head.update(num_subcenters=K, loss=dict(
        type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.3, m3=0.0))
    cfg.train_dataloader.dataset = dict(
        type='NoisyTinyFaces', noisy=[[i, c] for i, c in NOISY.items()])
    cfg.optim_wrapper.optimizer.lr = 0.05
    cfg.param_scheduler[-1].update(end=20)
    cfg.custom_hooks = []
    runner = build_runner(cfg)
    runner.train()
    config = str(work_dir / 'config.py')
    cfg.dump(config)
    dataset = NoisyTinyFaces(noisy=NOISY.items())
    model = runner.model.eval()
    images = torch.stack([dataset[i]['inputs'] for i in range(len(dataset))])
    with torch.no_grad():  # the preprocessing, written out
        emb = model.neck(model.backbone((images.float() - 127.5) / 127.5))
    labels = [dataset.label(i) for i in range(len(dataset))]
    return dict(config=config, ckpt=str(work_dir / 'iter_20.pth'),
                emb=emb[-1], labels=labels, dataset=dataset,
                weight=model.head.weight.detach().float().clone(),
                work_dir=work_dir)


def expected_report(emb, labels, weight, threshold):
    """Dominant sub-center and flagged samples, computed sample by sample."""
    centers = F.normalize(weight.view(NUM_CLASSES, K, DIM), dim=2)
    emb = F.normalize(emb, dim=1)
    cos = [[float(centers[c, k] @ e) for k in range(K)]
           for e, c in zip(emb, labels)]
    nearest = [max(range(K), key=lambda k: row[k]) for row in cos]
    dominant = []
    for c in range(NUM_CLASSES):
        votes = Counter(k for k, label in zip(nearest, labels) if label == c)
        dominant.append(min(votes, key=lambda k: (-votes[k], k))
                        if votes else -1)
    flagged = {}
    for i, (row, k, c) in enumerate(zip(cos, nearest, labels)):
        angle = math.degrees(math.acos(max(-1.0, min(1.0,
                                                     row[dominant[c]]))))
        if k != dominant[c]:
            flagged[i] = ('non_dominant', k, angle)
        elif angle > threshold:
            flagged[i] = ('far', k, angle)
    return dominant, flagged


def run_tool(tool, tmp_path, config, ckpt, threshold, *extra,
             name='report.json'):
    out = str(tmp_path / name)
    assert tool([config, ckpt, '--out', out, '--threshold', str(threshold),
                 '--batch-size', '7', *extra]) == 0
    if name.endswith('.txt'):
        with open(out) as f:
            return [line.rstrip('\n').split('\t') for line in f
                    if not line.startswith('#')]
    with open(out) as f:
        return json.load(f)


def check_report(report, dominant, flagged):
    assert report['dominant'] == dominant
    got = {row['index']: row for row in report['flagged']}
    assert sorted(got) == sorted(flagged)
    for i, (reason, nearest, angle) in flagged.items():
        assert got[i]['reason'] == reason and got[i]['nearest'] == nearest
        assert got[i]['angle'] == pytest.approx(angle, abs=1e-3)


def test_report_of_the_trained_model_matches_the_reference(
        tool, trained, tmp_path):
    for threshold in (75.0, 20.0):
        report = run_tool(tool, tmp_path, trained['config'], trained['ckpt'],
                          threshold)
        dominant, flagged = expected_report(trained['emb'], trained['labels'],
                                            trained['weight'], threshold)
        check_report(report, dominant, flagged)
        assert report['num_samples'] == 60
        assert report['num_subcenters'] == K
        assert sum(map(sum, report['counts'])) == 60
        if threshold == 75.0:  # training already set the wrong labels apart
            assert sorted(flagged) == sorted(NOISY)


def hand_set_centers(trained):
    """Per class: sub-center 0 at the mean of its correctly labelled
    samples, sub-center 1 at the mislabelled sample given that class (or
    opposite to the mean), sub-center 2 opposite to the mean."""
    emb, labels = F.normalize(trained['emb'], dim=1), trained['labels']
    weight = torch.zeros(NUM_CLASSES, K, DIM)
    for c in range(NUM_CLASSES):
        clean = [i for i in range(60) if labels[i] == c and i not in NOISY]
        mean = F.normalize(emb[clean].mean(dim=0), dim=0)
        weight[c] = -mean
        weight[c, 0] = mean
        for i, wrong in NOISY.items():
            if wrong == c:
                weight[c, 1] = emb[i]
                # the construction holds: clean samples are nearer the mean
                assert (emb[clean] @ mean > emb[clean] @ emb[i]).all()
    return weight.view(NUM_CLASSES, K * DIM)


def test_mislabelled_samples_are_found(tool, trained, tmp_path):
    merged = str(tmp_path / 'merged.pth')
    merge_checkpoint(trained['ckpt'], merged)
    checkpoint = load_file(merged)
    weight = hand_set_centers(trained)
    checkpoint['state_dict']['head.weight'] = weight
    atomic_save(checkpoint, merged, sidecar=True)  # its checksum anew
    emb, labels = trained['emb'], trained['labels']
    angles = [math.degrees(math.acos(min(1.0, float(
        F.normalize(weight[c, :DIM], dim=0) @ F.normalize(e, dim=0)))))
        for e, c in zip(emb, labels)]
    wide = max(a for i, a in enumerate(angles) if i not in NOISY) + 1
    lines = run_tool(tool, tmp_path, trained['config'], merged, wide,
                     name='noisy.txt')
    assert [(int(i), int(c), r) for i, c, r, _ in lines] == [
        (i, c, 'non_dominant') for i, c in sorted(NOISY.items())]
    # a tighter threshold flags the far samples too, as the reference does
    threshold = sum(sorted(angles)[40:42]) / 2  # not at a sample's angle
    report = run_tool(tool, tmp_path, trained['config'], merged, threshold)
    dominant, flagged = expected_report(emb, labels, weight, threshold)
    assert dominant == [0] * NUM_CLASSES
    assert {r for r, _, _ in flagged.values()} == {'far', 'non_dominant'}
    check_report(report, dominant, flagged)


def test_list_file_gives_the_dataset_report(tool, trained, tmp_path):
    folder = tmp_path / 'faces'
    folder.mkdir()
    lines = []
    for i in range(60):
        image = trained['dataset'][i]['inputs'][0].numpy()
        cv2.imwrite(str(folder / f'{i}.png'), image)
        lines.append(f'faces/{i}.png {trained["labels"][i]}\n')
    with open(tmp_path / 'train.txt', 'w') as f:
        f.writelines(lines)
    by_list = run_tool(tool, tmp_path, trained['config'], trained['ckpt'],
                       20.0, '--list', str(tmp_path / 'train.txt'))
    by_dataset = run_tool(tool, tmp_path, trained['config'], trained['ckpt'],
                          20.0)
    assert by_list['dominant'] == by_dataset['dominant']
    assert by_list['counts'] == by_dataset['counts']
    assert [r['index'] for r in by_list['flagged']] == [
        r['index'] for r in by_dataset['flagged']]
    assert [r['id'].rsplit('/', 1)[-1] for r in by_list['flagged']] == [
        f"{r['id']}.png" for r in by_dataset['flagged']]


def test_wrong_head_shape_and_bad_threshold_are_refused(tool, trained,
                                                        tmp_path, capsys):
    from mmengine.config import Config
    cfg = Config.fromfile(trained['config'])
    cfg.model.head.num_subcenters = 2
    config = str(tmp_path / 'k2.py')
    cfg.dump(config)
    out = str(tmp_path / 'x.json')
    assert tool([config, trained['ckpt'], '--out', out]) == 1
    assert f'10 x {K * DIM}' in capsys.readouterr().err
    assert tool([trained['config'], trained['ckpt'], '--threshold',
                 '200']) == 1
    assert '200' in capsys.readouterr().err
