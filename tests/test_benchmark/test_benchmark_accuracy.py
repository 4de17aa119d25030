"""The accuracy benchmark: its data, pairs, method specs, report and a smoke
run of the command line (tiny sizes, 2 gloo ranks)."""
import json
import re
from dataclasses import replace

import pytest
import torch
from helpers import load_tool

from mmpfc.benchmark.accuracy import (AccuracyConfig, AccuracyRecord,
                                      SyntheticIdentityDataset, build_pairs,
                                      check_line, check_methods,
                                      compact_storage_labels, held_out,
                                      markdown, paired_difference,
                                      parse_methods, summarize)

#: no per-sample variation: a sample is its identity's prototype exactly
CLEAN = dict(jitter_std=0, rotate_deg=0, scale=0, shift=0, contrast=0,
             brightness=0, noise_std=0, occlusion_p=0)


def _tool():
    return load_tool('benchmark_accuracy.py')


# ------------------------------------------------------------------ data
def test_held_out_identities_are_disjoint_and_of_the_same_universe():
    train = SyntheticIdentityDataset(num_classes=50, seed=3, noise_std=7)
    test = held_out(train, 20)
    assert list(test.identities) == list(range(50, 70))
    assert set(test.identities).isdisjoint(train.identities)
    assert test.noise_std == 7 and test.seed == 3
    # the same universe: identity k is the same latent in both sets
    bigger = SyntheticIdentityDataset(num_classes=70, seed=3)
    assert torch.equal(bigger.grids[50:], test.grids)
    assert not torch.equal(test.grids[0], train.grids[0])
    with pytest.raises(ValueError, match='num_identities must be >= 2'):
        held_out(train, 1)


def test_build_pairs_layout():
    """Half same, half different, in a mixed order; pair p = images 2p and
    2p + 1, each the render of its listed held-out identity."""
    train = SyntheticIdentityDataset(num_classes=30, seed=1, **CLEAN)
    test = held_out(train, 12)
    pairs = build_pairs(test, 40, seed=5)
    ids = pairs.identities
    assert pairs.images.shape == (80, 1, 32, 32)
    assert pairs.images.dtype == torch.uint8
    assert len(pairs) == 40 and int(pairs.issame.sum()) == 20
    assert torch.equal(pairs.issame, ids[0::2] == ids[1::2])
    assert set(ids.tolist()) <= set(test.identities)
    assert set(ids.tolist()).isdisjoint(train.identities)
    # a shuffled order (the protocol's folds are contiguous), not blocks
    switches = int((pairs.issame[1:] != pairs.issame[:-1]).sum())
    assert switches >= 10
    # without variation an image is exactly its identity's prototype
    labels = ids - test.identity_offset
    expected = test.render(labels, torch.Generator(), flip=False)
    assert torch.equal(pairs.images, expected)
    # with variation, the two images of a genuine pair differ
    noisy = build_pairs(held_out(SyntheticIdentityDataset(30, seed=1), 12),
                        40, seed=5)
    same = torch.nonzero(noisy.issame).flatten()
    assert not torch.equal(noisy.images[2 * same], noisy.images[2 * same + 1])
    for bad in (0, 7):
        with pytest.raises(ValueError, match=f'even number.*got {bad}'):
            build_pairs(test, bad, seed=0)


def test_samples_vary_within_an_identity_and_are_reproducible():
    data = SyntheticIdentityDataset(num_classes=10, seed=0)
    labels = torch.tensor([3, 3, 4])
    first = data.render(labels, torch.Generator().manual_seed(1))
    again = data.render(labels, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    gap = (first.float()[0] - first.float()[1]).abs().mean()
    assert gap > 5  # pose, photometry and noise change many pixels
    item = data[13]
    assert item['inputs'].shape == (1, 32, 32)
    assert int(item['data_samples'].gt_label) == 3
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 10\)'):
        data.render(torch.tensor([10]), torch.Generator())
    with pytest.raises(ValueError, match="occlusion_p must be in"):
        SyntheticIdentityDataset(10, occlusion_p=2)


# --------------------------------------------------------------- methods
def test_parse_methods_defaults_and_kwargs():
    dp, mp, pfc1, pfc3 = parse_methods('dp,mp,pfc0.1,pfc0.3')
    assert (dp.label, dp.head) == ('DP', dict(type='MarginSoftmaxHead'))
    assert mp.head == dict(type='PartialFCHead', sample_rate=1.0)
    assert (pfc1.label, pfc1.head['sample_rate']) == ('PFC0.1', 0.1)
    assert pfc3.label == 'PFC0.3' and pfc3.optim_wrapper == {}
    [spec] = parse_methods('pfc0.1:center_dtype=bfloat16:init_std=0.02:'
                           'optim.center_state_dtype=int8:label=PFC0.1-q')
    assert spec.label == 'PFC0.1-q' and spec.name == 'pfc0.1'
    assert spec.head == dict(type='PartialFCHead', sample_rate=0.1,
                             center_dtype='bfloat16', init_std=0.02)
    assert spec.optim_wrapper == dict(center_state_dtype='int8')
    json_specs = parse_methods(
        '["mp", {"name": "pfc0.1", "label": "B", "head": {"init_std": 0.1},'
        ' "optim_wrapper": {"x": 1}}]')
    assert [m.label for m in json_specs] == ['MP', 'B']
    assert json_specs[1].head['init_std'] == 0.1
    assert json_specs[1].optim_wrapper == dict(x=1)
    # a variant without a label is named by its options
    labels = [m.label for m in parse_methods(
        ['pfc0.1', 'pfc0.1:center_dtype=bfloat16',
         dict(name='pfc0.1', optim_wrapper=dict(center_state_dtype='int8'))])]
    assert labels == ['PFC0.1', 'PFC0.1:center_dtype=bfloat16',
                      'PFC0.1:optim.center_state_dtype=int8']


@pytest.mark.parametrize('spec, message', [
    ('pfc2', r"'pfc2'.*expected 'dp', 'mp' or 'pfc<rate>'"),
    ('pfc0.1:center_dtype', r"option 'center_dtype' is not KEY=VALUE"),
    ('mp,pfc1.0', r"labels \['MP'\] repeat"),
    ('[{"label": "x"}]', r'expected a dict with a "name"'),
    ('[mp]', r'not a JSON list'),
    (',', 'no methods given'),
])
def test_parse_methods_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(spec)


def test_unknown_kwargs_fail_before_any_launch(tmp_path, capsys):
    cfg = AccuracyConfig(methods='mp,pfc0.1:no_such_arg=1', num_classes=20)
    with pytest.raises(ValueError, match=r"method 'PFC0.1:no_such_arg=1' "
                       r"\(head \{.*'no_such_arg': 1\}.*no_such_arg"):
        check_methods(cfg, cfg.method_specs())
    tool = _tool()
    argv = ['--quick', '--methods', 'mp,pfc0.1:optim.no_such_arg=1',
            '--out-dir', str(tmp_path)]
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "method 'PFC0.1:optim.no_such_arg=1'" in err
    assert "unexpected keyword argument 'no_such_arg'" in err
    assert not (tmp_path / 'accuracy.json').exists()


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match='num_pairs must be an even number'):
        AccuracyConfig(num_pairs=101).validate()
    with pytest.raises(ValueError, match=r"margin 'sphere': expected one"):
        AccuracyConfig(margin='sphere').validate()
    with pytest.raises(ValueError, match=r'warmup_steps=10 must lie in'):
        AccuracyConfig(steps=10, warmup_steps=10).validate()
    with pytest.raises(ValueError, match=r"data options \['nosie_std'\]"):
        AccuracyConfig(data=dict(nosie_std=3)).validate()
    with pytest.raises(ValueError, match='image_size=64: .* takes 32x32'):
        AccuracyConfig(data=dict(image_size=64)).validate()
    with pytest.raises(ValueError, match=r'noise_std must be >= 0, got -1'):
        AccuracyConfig(data=dict(noise_std=-1)).validate()


def test_loss_over_all_centers_ignores_sampling():
    from mmpfc.benchmark.accuracy.worker import all_centers
    from mmpfc.registry import MODELS
    heads = [MODELS.build(dict(type='PartialFCHead', num_classes=200,
                               in_channels=8, sample_rate=rate, seed=0))
             for rate in (1.0, 0.1)]
    mp, pfc = heads
    with torch.no_grad():
        pfc.weight.copy_(mp.weight)
    emb, labels = torch.randn(4, 8), torch.tensor([1, 5, 9, 150])
    with torch.no_grad():
        sampled = pfc.loss_by_labels(emb, labels)
        with all_centers(pfc):
            full = pfc.loss_by_labels(emb, labels)
        dense = mp.loss_by_labels(emb, labels)
    assert float(full) == pytest.approx(float(dense), rel=1e-5)
    assert float(sampled) < float(full)  # 20 of the 200 columns
    assert pfc.sample_rate == 0.1 and pfc.samples_centers


# ---------------------------------------------------------------- report
def _record(label, seed, accuracy, loss=1.0, name='', head=None,
            optim=None):
    return AccuracyRecord(
        label=label, train_loss=loss, full_loss=loss + 1, first_loss=loss,
        loss_curve=[loss], train_s=8.0, accuracy=accuracy, fold_std=0.0,
        threshold=0.5, eval_s=2.0, seed=seed, name=name, head=head or {},
        optim_wrapper=optim or {}, launch_s=12.0, train_s_ranks=[8.0],
        run_s=10.0)


def test_summary_table_and_check():
    records = [_record('MP', 0, 0.90, 2.0), _record('PFC0.1', 0, 0.896),
               _record('MP', 1, 0.92, 4.0), _record('PFC0.1', 1, 0.910)]
    mp, pfc = summarize(records)
    assert mp.accuracy == pytest.approx(0.91)
    assert mp.accuracy_std == pytest.approx(0.0141421, rel=1e-4)
    assert mp.train_loss == 3.0 and mp.seeds == [0, 1]
    table = markdown([mp, pfc]).splitlines()
    assert table[0].startswith('| method | verification accuracy % |')
    assert table[2] == ('| MP | 91.00 +- 1.41 | 3.000 +- 1.414 | '
                        '4.000 +- 1.414 | 10 |')
    check = paired_difference(records, 'PFC0.1', 'MP', 0.5)
    assert check.difference_points == pytest.approx(-0.7)
    assert not check.passed
    assert check_line(check) == ('PFC0.1 within 0.5 points of model '
                                 'parallel: FAIL (difference -0.70)')
    close = [replace(r, accuracy=r.accuracy + 0.004)
             if r.label == 'PFC0.1' else r for r in records]
    assert check_line(paired_difference(
        close, 'PFC0.1', 'MP', 0.5)).endswith('PASS (difference -0.30)')
    assert 'not checked' in check_line(
        paired_difference(records[:1], 'PFC0.1', 'MP', 0.5))


def test_compact_rows_are_checked_against_fp32_pfc():
    """Compact PFC0.1 rows with stochastic rounding are the ones compared
    with fp32 PFC0.1, at their own tolerance; a round-to-nearest row and
    other methods are not."""
    def run(label, name, head=None, optim=None, acc=0.9):
        return _record(label, 0, acc, name=name, head=head, optim=optim)
    records = [
        run('PFC0.1', 'pfc0.1', acc=0.900),
        run('bf16', 'pfc0.1', dict(center_dtype='bfloat16'), acc=0.898),
        run('int8', 'pfc0.1', optim=dict(center_state_dtype='int8'),
            acc=0.895),
        run('near', 'pfc0.1', dict(center_dtype='bfloat16',
                                   center_rounding='nearest')),
        run('MP bf16', 'mp', dict(center_dtype='bfloat16'))]
    assert compact_storage_labels(records) == ['bf16', 'int8']
    check = paired_difference(records, 'bf16', 'PFC0.1', 0.3)
    assert check.passed and check.tolerance == 0.3
    assert check_line(check, 'fp32 PFC0.1') == (
        'bf16 within 0.3 points of fp32 PFC0.1: PASS (difference -0.20)')
    assert not paired_difference(records, 'int8', 'PFC0.1', 0.3).passed


# ------------------------------------------------------------- smoke run
def test_default_methods_include_the_compact_storages():
    labels = [m.label for m in AccuracyConfig().method_specs()]
    assert labels == ['DP', 'MP', 'PFC0.1', 'PFC0.3', 'PFC0.1 bf16',
                      'PFC0.1 bf16/int8']


def test_quick_run_two_ranks(tmp_path):
    """Every kind of head on 2 gloo ranks, tiny sizes: one row each, sane
    accuracies and losses, the JSON per seed and the check lines (PFC0.1
    against MP, the compact storage against fp32 PFC0.1)."""
    tool = _tool()
    methods = ('dp,mp,pfc0.1,pfc0.1:center_dtype=bfloat16:'
               'optim.center_state_dtype=int8:label=PFC0.1 bf16/int8')
    assert tool.main(['--quick', '--methods', methods,
                      '--out-dir', str(tmp_path)]) == 0
    text = (tmp_path / 'accuracy.md').read_text()
    rows = re.findall(r'^\| ([^|]+?) \| ([\d.]+) \+- [\d.]+ \| ([\d.]+) '
                      r'\+-', text, re.M)
    labels = ['DP', 'MP', 'PFC0.1', 'PFC0.1 bf16/int8']
    assert [r[0] for r in rows] == labels
    for _, accuracy, loss in rows:
        assert 50.0 <= float(accuracy) <= 100.0
        assert 0 < float(loss) < 30
    assert re.search(r'^PFC0.1 within 0.5 points of model parallel: '
                     r'(PASS|FAIL) \(difference [+-]\d+\.\d\d\)$', text, re.M)
    for label in labels[3:]:
        assert re.search(rf'^{re.escape(label)} within 0.3 points of fp32 '
                         r'PFC0.1: (PASS|FAIL) \(difference [+-]\d+\.\d\d\)$',
                         text, re.M), text
    out = json.loads((tmp_path / 'accuracy.json').read_text())
    assert [r['label'] for r in out['runs']] == labels
    assert [c['label'] for c in out['storage_checks']] == labels[3:]
    for run in out['runs']:
        assert 0.5 <= run['accuracy'] <= 1.0 and run['seed'] == 0
        # it learned: the loss fell during training
        assert run['train_loss'] < run['first_loss']
    assert out['config']['world_size'] == 2
    assert out['check']['label'] == 'PFC0.1'
