"""SyntheticFaceDataset: deterministic, cheap, labels over all classes."""
import time

import numpy as np
import pytest
import torch
from messages import assert_mentions

from mmpfc.datasets import SyntheticFaceDataset
from mmpfc.registry import DATASETS

DEFAULTS = dict(type='SyntheticFaceDataset', num_classes=7, num_samples=50,
                image_size=16)


def build(**kwargs):
    return DATASETS.build({**DEFAULTS, **kwargs})


def test_item_format_and_labels_cover_every_class():
    ds = build()
    assert isinstance(ds, SyntheticFaceDataset) and len(ds) == 50
    item = ds[3]
    assert item['inputs'].shape == (3, 16, 16)
    assert item['inputs'].dtype == torch.uint8
    assert int(item['data_samples'].gt_label) == 3
    assert item['data_samples'].sample_idx == 3
    labels = [int(ds[i]['data_samples'].gt_label) for i in range(len(ds))]
    assert sorted(set(labels)) == list(range(7))
    assert np.bincount(labels).min() >= 50 // 7  # spread, not one label
    assert ds.num_classes == 7 and ds.metainfo['num_classes'] == 7
    with pytest.raises(IndexError):
        ds[50]


@pytest.mark.parametrize('learnable', [False, True])
def test_deterministic_across_instances(learnable):
    a, b = build(learnable=learnable), build(learnable=learnable)
    for i in (0, 9, 49):
        assert torch.equal(a[i]['inputs'], b[i]['inputs'])
    other_seed = build(learnable=learnable, seed=1)
    assert not torch.equal(a[9]['inputs'], other_seed[9]['inputs'])


def test_learnable_images_cluster_by_identity():
    ds = build(learnable=True, num_classes=5, num_samples=40,
               image_size=(24, 20), noise_std=30.0)
    assert ds[0]['inputs'].shape == (3, 24, 20)
    imgs = torch.stack([ds[i]['inputs'].float() for i in range(40)])
    labels = torch.arange(40) % 5
    dist = torch.cdist(imgs.flatten(1), imgs.flatten(1))
    same = labels[:, None] == labels[None]
    off_diag = ~torch.eye(40, dtype=torch.bool)
    assert dist[same & off_diag].mean() < 0.6 * dist[~same].mean()
    # same identity, different noise
    assert not torch.equal(ds[0]['inputs'], ds[5]['inputs'])


def test_benchmark_mode_is_cheap_at_millions_of_classes():
    ds = build(num_classes=3_000_000, num_samples=1_000_000, image_size=112)
    start = time.perf_counter()
    labels = [int(ds[i * 997]['data_samples'].gt_label) for i in range(300)]
    assert (time.perf_counter() - start) / 300 < 2e-3  # seconds per item
    assert max(labels) > 100_000  # indices map to distinct, large ids
    # items do not share storage with the bank (no mutation through views)
    item = ds[0]['inputs']
    item.zero_()
    assert ds[0]['inputs'].any()


def test_pipeline_receives_hwc_rgb_image():
    seen = {}

    def record(results):
        seen.update(results)
        return results

    ds = build(learnable=True, pipeline=[
        record, dict(type='mmpretrain.PackInputs')])
    item = ds[8]
    assert seen['img'].shape == (16, 16, 3) and seen['img'].dtype == np.uint8
    assert seen['gt_label'] == 1 and seen['img_shape'] == (16, 16)
    packed = build(learnable=True)[8]['inputs']
    assert torch.equal(item['inputs'], packed)  # same pixels, CHW


@pytest.mark.parametrize('bad', [
    dict(num_classes=0), dict(num_samples=0), dict(image_size=(16, 0)),
    dict(image_size=(1, 2, 3)), dict(noise_std=-1.0),
    dict(prototype_grid=0)])
def test_bad_arguments_name_the_value(bad):
    (key, value), = bad.items()
    with pytest.raises(ValueError) as err:
        build(**bad)
    assert_mentions(err, 'SyntheticFaceDataset', key, f'got {value!r}')
