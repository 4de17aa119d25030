"""Every shipped training config parses, names registered components and
builds its model (big heads with fewer classes)."""
import glob
import os.path as osp

import pytest
import torch
from helpers import ROOT
from mmengine.config import Config

import mmpfc  # noqa: F401
from mmpfc.registry import (DATASETS, HOOKS, MODEL_WRAPPERS, MODELS,
                            OPTIM_WRAPPERS, RUNNERS)

CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'pfc', '*.py')))
SMALL_HEAD = 100_000  # build heads up to this size as they are
EXPECTED = {  # config: (num_classes, sample_rate, head type)
    'mbf_pfc0.1_demo_cpu': (1000, 0.1, 'PartialFCHead'),
    'r50_pfc0.1_3m': (3000000, 0.1, 'PartialFCHead'),
    'r50_mp_3m': (3000000, 1.0, 'PartialFCHead'),
    'r50_dp_3m': (3000000, None, 'MarginSoftmaxHead'),
    'r50_mp_ms1mv3': (93431, 1.0, 'PartialFCHead'),
    'r50_mp_glint360k': (360232, 1.0, 'PartialFCHead'),
    'r50_pfc0.2_webface42m': (2059906, 0.2, 'PartialFCHead'),
    'vit_t_pfc0.3_webface42m': (2059906, 0.3, 'PartialFCHead'),
}


def name_of(path):
    return osp.splitext(osp.basename(path))[0]


def test_every_config_is_listed():
    assert sorted(map(name_of, CONFIGS)) == sorted(EXPECTED)


@pytest.mark.parametrize('path', CONFIGS, ids=name_of)
def test_config_parses_and_names_registered_components(path):
    with open(path) as f:
        assert f.readline().startswith('# '), 'say what it reproduces'
    cfg = Config.fromfile(path)
    classes, rate, head_type = EXPECTED[name_of(path)]
    head = cfg.model.head
    assert (head.num_classes, head.get('sample_rate'), head.type) == \
        (classes, rate, head_type)
    assert cfg.train_dataloader.dataset.num_classes == classes
    assert cfg.train_dataloader.sampler.type == 'InfiniteSampler'
    assert cfg.default_scope == 'mmpfc'
    assert RUNNERS.get(cfg.runner_type).__name__ == 'PartialFCRunner'
    assert MODEL_WRAPPERS.get(cfg.model_wrapper_cfg.type) is not None
    assert OPTIM_WRAPPERS.get(cfg.optim_wrapper.type).__name__.startswith(
        'PartialFC')
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=5.0)
    assert DATASETS.get(cfg.train_dataloader.dataset.type) is not None
    for hook in cfg.custom_hooks:
        assert HOOKS.get(hook.type) is not None, hook.type
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    # the decay ends with training
    assert cfg.param_scheduler[-1].end == cfg.train_cfg.max_iters
    assert cfg.param_scheduler[-1].type == 'PolyLR'


@pytest.mark.parametrize('path', CONFIGS, ids=name_of)
def test_model_builds_and_embeds(path):
    cfg = Config.fromfile(path)
    if cfg.model.head.num_classes > SMALL_HEAD:
        cfg.model.head.num_classes = 1000
    model = MODELS.build(cfg.model)
    if name_of(path).startswith('r50'):
        assert model.backbone.depth == 50
    if name_of(path).startswith('vit_t'):
        assert model.backbone.patch_resolution == (12, 12)
        assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-3,
                                                   weight_decay=0.1)
    head = model.head
    assert head.weight.shape == (cfg.model.head.num_classes,
                                 cfg.model.head.in_channels)
    model.eval()
    with torch.no_grad():
        emb, = model(torch.zeros(1, 3, 112, 112), mode='tensor')
    assert emb.shape == (1, cfg.model.head.in_channels)


def test_demo_trains_one_step_from_its_dataset():
    cfg = Config.fromfile(osp.join(ROOT, 'configs/pfc/mbf_pfc0.1_demo_cpu.py'))
    model = MODELS.build(cfg.model)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert dataset.learnable and dataset.num_classes == 1000
    from mmengine.dataset import pseudo_collate
    data = model.data_preprocessor(
        pseudo_collate([dataset[i] for i in range(4)]), True)
    loss = model(**data, mode='loss')['loss']
    assert torch.isfinite(loss) and loss > 0
    assert data['inputs'].min() >= -1 and data['inputs'].max() <= 1


#: the real-data configs validate on LFW / CFP-FP / AgeDB-30; the synthetic
#: speed tests and the CPU demo do not
VALIDATED = ('r50_mp_glint360k', 'r50_mp_ms1mv3', 'r50_pfc0.2_webface42m',
             'vit_t_pfc0.3_webface42m')


@pytest.mark.parametrize('path', CONFIGS, ids=name_of)
def test_which_configs_validate(path):
    cfg = Config.fromfile(path)
    assert cfg.default_hooks.logger.log_metric_by_epoch is False
    assert bool(cfg.get('val_dataloader')) == (name_of(path) in VALIDATED)


@pytest.mark.parametrize('name', VALIDATED)
def test_validation_keeps_best_checkpoint_on_a_real_metric_key(name):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'pfc', f'{name}.py'))
    from mmpfc.registry import METRICS
    metric = METRICS.build(cfg.val_evaluator)
    assert metric.feat_key == 'raw_feat'  # what PartialFCHead.predict sets
    hook = cfg.default_hooks.checkpoint
    assert (hook.save_best, hook.rule) == ('mean_accuracy', 'greater')
    # the key save_best watches is one the metric reports
    rng = torch.Generator().manual_seed(0)
    samples = [dict(raw_feat=torch.randn(4, generator=rng),
                    dataset_name='lfw', image_idx=image, flip=flip,
                    is_same=bool((image // 2) % 2))
               for image in range(40) for flip in (False, True)]
    metric.process({}, samples)
    assert 'mean_accuracy' in metric.compute_metrics(metric.results)
