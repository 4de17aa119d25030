"""Checkpoint format: atomic writes, manifest, bad input refused by name
(on the tiny training set-up of ``tests/tiny_training.py``)."""
import glob
import os
import os.path as osp
import pickle
import shutil

import pytest
import torch
from messages import assert_in_order, assert_mentions
from mmengine.evaluator import BaseMetric
from tiny_training import (DIM, NUM_CLASSES, build_runner, check_shard_dirs,
                           head_state, make_cfg, shard_dirs)

import mmpfc  # noqa: F401
from mmpfc.checkpoint import (CheckpointError, Manifest, ShardedCheckpointer,
                              atomic_save, load_file, remove_stale_shard_dirs)
from mmpfc.registry import METRICS


# --------------------------------------------------------------- the tests
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-rank run of 4 iterations, checkpoints at 2 and 4."""
    work_dir = tmp_path_factory.mktemp('ckpt')
    runner = build_runner(make_cfg(work_dir))
    runner.train()
    return work_dir, head_state(runner)


def test_checkpoint_files(trained):
    work_dir, _ = trained
    check_shard_dirs(work_dir, ['iter_2.pth', 'iter_4.pth'])
    checkpoint = load_file(str(work_dir / 'iter_4.pth'))
    manifest = checkpoint['meta']['mmpfc']
    assert 'head.weight' not in checkpoint['state_dict']
    assert 'backbone.features.0.weight' in checkpoint['state_dict']
    entry = manifest['params']['head.weight']
    assert (entry['num_classes'], entry['embedding_size']) == (10, DIM)
    assert entry['class_ranges'] == [[0, 10]]
    assert entry['row_state'] == ['momentum_buffer']
    assert manifest['world_size'] == 1 and manifest['samplers'] == ['head']
    shard = load_file(str(work_dir / manifest['shard_dir'] / 'rank0-of1.pth'))
    assert shard['params']['head.weight']['weight'].shape == (10, DIM)
    # the shard file names the save it belongs to
    assert (shard['token'], shard['rank'], shard['world_size']) == (
        manifest['token'], 0, 1)
    index = entry['optimizer'][1]
    assert index not in checkpoint['optimizer']['state']  # stripped
    assert not [n for n in os.listdir(work_dir) if n.endswith('.tmp')]


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = str(tmp_path / 'a.pth')
    atomic_save({'x': torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        atomic_save({'x': Unpicklable()}, path)
    assert torch.equal(load_file(path)['x'], torch.ones(3))
    assert os.listdir(tmp_path) == ['a.pth']  # no temp file left


@pytest.mark.parametrize('content, named', [
    (b'hello world\n', ('not a torch checkpoint', "b'hello world\\n'")),
    (pickle.dumps({'a': 1}), ('not a torch checkpoint', "b'\\x80")),
    (b'', ('(0 bytes)', 'empty')),
])
def test_load_file_refuses_files_torch_did_not_write(tmp_path, content,
                                                     named):
    """Named: the file, what it starts with or its size."""
    path = tmp_path / 'c.pth'
    path.write_bytes(content)
    for mmap in (False, True):
        with pytest.raises(CheckpointError) as err:
            load_file(str(path), mmap=mmap)
        assert_mentions(err, str(path), *named)


@pytest.mark.parametrize('legacy', [False, True])
def test_load_file_names_a_file_truncated_anywhere(tmp_path, legacy):
    path = tmp_path / 'c.pth'
    torch.save({'w': torch.zeros(1000)}, path,
               _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    # torch fails differently at each: central directory missing, data cut
    # (OSError), pickle cut (IndexError, struct.error, EOF)
    cuts = (16, 18, 20, len(data) // 2, len(data) - 100, len(data) - 1)
    for cut in cuts:
        path.write_bytes(data[:cut])
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as err:
                load_file(str(path), mmap=mmap)
            assert_mentions(err, f'{path} ({cut} bytes)', 'truncated')


def test_stale_shard_folders_are_removed(tmp_path):
    (tmp_path / 'iter_1.pth.shards-0123456789ab').mkdir()  # main file gone
    (tmp_path / '.iter_2.pth.0123456789ab.tmp').write_bytes(b'x')
    (tmp_path / 'iter_3.pth').write_bytes(b'x')
    (tmp_path / 'iter_3.pth.shards-0123456789ab').mkdir()  # kept
    (tmp_path / 'notes.shards-x').mkdir()  # not ours
    removed = remove_stale_shard_dirs(str(tmp_path))
    assert sorted(removed) == ['.iter_2.pth.0123456789ab.tmp',
                               'iter_1.pth.shards-0123456789ab']
    assert sorted(os.listdir(tmp_path)) == [
        'iter_3.pth', 'iter_3.pth.shards-0123456789ab', 'notes.shards-x']


def _copy(work_dir, dst):
    shutil.copytree(work_dir, dst)
    return dst


def _fresh_runner(tmp_path, **kwargs):
    runner = build_runner(make_cfg(tmp_path / 'new', **kwargs))
    model = runner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return runner, before


def _assert_unchanged(runner, before):
    after = runner.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize('change, named', [
    (dict(num_classes=12), ('num_classes=10', 'num_classes=12')),
    (dict(dim=16, backbone=dict(type='MobileFaceNet', embedding_size=16,
                                blocks=(1, 1, 1, 1), scale=1)),
     ('num_classes=10', 'embedding size 120', 'embedding size 16')),
])
def test_refuses_other_head(trained, tmp_path, change, named):
    """Named: the saved head's and the model's sizes."""
    runner, before = _fresh_runner(tmp_path, **change)
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(trained[0] / 'iter_4.pth'))
    assert_in_order(err, 'head.weight', *named)  # saved, then model
    _assert_unchanged(runner, before)


def test_refuses_other_backbone(trained, tmp_path):
    runner, before = _fresh_runner(tmp_path, backbone=dict(
        type='MobileFaceNet', embedding_size=DIM, blocks=(1, 1, 1, 1),
        scale=1))
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(trained[0] / 'iter_4.pth'))
    assert_mentions(err, 'missing in the checkpoint: backbone.',
                    'not in the model: backbone.features.0.weight')
    _assert_unchanged(runner, before)


def test_refuses_truncated_and_missing_files(trained, tmp_path):
    work_dir = _copy(trained[0], tmp_path / 'copy')
    runner, before = _fresh_runner(tmp_path)
    main = work_dir / 'iter_4.pth'
    shard_dir = load_file(str(main))['meta']['mmpfc']['shard_dir']
    shard = work_dir / shard_dir / 'rank0-of1.pth'

    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(main))
    assert_mentions(err, str(main), 'truncated', 'rank0-of1.pth '
                    f'({len(data) // 2} of {len(data)} bytes)')
    shard.unlink()
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(main))
    assert_mentions(err, str(main), '1 of 1 shard files missing',
                    str(work_dir / shard_dir), 'rank0-of1.pth')
    data = main.read_bytes()
    main.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(main))
    # the size found and the size its checksum file recorded
    assert_mentions(err, str(main), f'{len(data) - 100} bytes',
                    str(len(data)), 'truncated')
    _assert_unchanged(runner, before)


def test_load_from_restores_weights_not_sampler(trained, tmp_path):
    work_dir, state = trained
    runner, _ = _fresh_runner(tmp_path)
    runner.load_checkpoint(str(work_dir / 'iter_4.pth'))
    model = runner.model
    assert torch.equal(model.head.weight.detach(), state['weight'])
    for key, value in state['backbone'].items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_plain_single_rank_state_dict_loads(trained, tmp_path):
    """A bare state dict with the full (C, D) head (e.g. converted)."""
    work_dir, state = trained
    runner, _ = _fresh_runner(tmp_path)
    plain = dict(state_dict={
        **{f'backbone.{k}': v for k, v in state['backbone'].items()},
        'head.weight': state['weight']})
    torch.save(plain['state_dict'], tmp_path / 'plain.pth')
    runner.load_checkpoint(str(tmp_path / 'plain.pth'))
    assert torch.equal(runner.model.head.weight.detach(), state['weight'])
    plain['state_dict']['head.weight'] = state['weight'][:7]
    torch.save(plain, tmp_path / 'part.pth')
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(tmp_path / 'part.pth'))
    # the hint: a plain file of 7 rows is likely one rank's part
    assert_mentions(err, 'head.weight', 'num_classes=7', 'num_classes=10',
                    'one rank')


def test_model_without_sharded_head_saves_normally(tmp_path):
    cfg = make_cfg(tmp_path, max_iters=2)
    cfg.model.head = dict(type='MarginSoftmaxHead', num_classes=NUM_CLASSES,
                          in_channels=DIM)
    cfg.custom_hooks = []
    runner = build_runner(cfg)
    runner.train()
    assert shard_dirs(tmp_path) == []
    checkpoint = load_file(str(tmp_path / 'iter_2.pth'))
    assert checkpoint['state_dict']['head.weight'].shape == (10, DIM)
    assert 'mmpfc' not in checkpoint['meta']


@METRICS.register_module(force=True)
class CkptRisingScore(BaseMetric):
    """A validation score that improves at every evaluation."""
    calls = 0

    def process(self, data_batch, data_samples):
        self.results.append(0)

    def compute_metrics(self, results):
        CkptRisingScore.calls += 1
        return dict(score=float(CkptRisingScore.calls))


def test_save_best_replaces_previous_best_with_its_shards(tmp_path):
    cfg = make_cfg(tmp_path, max_iters=4, interval=10)
    cfg.default_hooks.checkpoint.save_best = 'score'
    cfg.default_hooks.checkpoint.rule = 'greater'
    cfg.train_cfg.val_interval = 2
    cfg.val_dataloader = dict(cfg.train_dataloader, sampler=dict(
        type='DefaultSampler', shuffle=False))
    cfg.val_cfg = dict()
    cfg.val_evaluator = dict(type='CkptRisingScore')
    build_runner(cfg).train()
    mains = sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth'))
    assert mains == ['best_score_iter_4.pth', 'iter_4.pth']
    check_shard_dirs(tmp_path, mains)


def unshared_disk_worker(rank, world_size, work_dir, local_dir):
    """Rank 1 writes its shard to a folder of its own, as on a second
    machine whose work dir is not shared."""
    import mmpfc.checkpoint.checkpointer as sharded
    original = sharded.atomic_save

    def save_elsewhere(obj, path):
        return original(obj, osp.join(local_dir, osp.basename(path)))

    if rank == 1:  # put back below, though the rank's process ends anyway
        sharded.atomic_save = save_elsewhere
    try:
        runner = build_runner(make_cfg(work_dir, world_size=2, max_iters=2,
                                       interval=2))
        runner.train()
    except CheckpointError as err:
        return str(err), sorted(os.listdir(work_dir))
    finally:
        sharded.atomic_save = original
    return None, sorted(os.listdir(work_dir))


def test_save_refuses_a_work_dir_not_shared_by_every_rank(tmp_path):
    from dist_utils import run_distributed
    work_dir, local = tmp_path / 'shared', tmp_path / 'rank1_local'
    work_dir.mkdir()
    local.mkdir()
    results = run_distributed(unshared_disk_worker, 2, str(work_dir),
                              str(local))
    for message, files in results:
        assert message is not None  # every rank stops, none hangs
        assert "['rank1-of2.pth']" in message and 'shared' in message
        assert 'iter_2.pth' not in files  # no main file naming lost shards


def test_ema_hook_with_sharded_head_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.custom_hooks = [dict(type='EMAHook')]
    runner = build_runner(cfg)
    with pytest.raises(ValueError,
                       match=r"EMAHook .* rank 0 only.*'head\.weight'"):
        runner.train()
    assert not glob.glob(osp.join(str(tmp_path), '*.pth'))  # nothing trained


# ------------------------------------------------ the manifest, typed
def test_manifest_reads_and_writes_the_stored_dict_unchanged(trained):
    path = str(trained[0] / 'iter_4.pth')
    stored = load_file(path)['meta']['mmpfc']
    manifest = Manifest.from_dict(stored, path)
    assert manifest.to_dict() == stored
    assert manifest.params['head.weight'].class_ranges == ((0, 10), )
    assert manifest.inline(manifest.params).to_dict()['layout'] == 'inline'


def _stored_manifest(trained):
    return load_file(str(trained[0] / 'iter_4.pth'))['meta']['mmpfc']


FIELD = "meta['mmpfc']"
PARAM = f"{FIELD}['params']['head.weight']"


@pytest.mark.parametrize('edit, named', [
    (lambda m: m.pop('world_size'),
     (f"{FIELD}['world_size']", 'missing', 'int > 0')),
    (lambda m: m.pop('token'), (f"{FIELD}['token']", 'missing')),
    (lambda m: m.update(world_size='1'),
     (f"{FIELD}['world_size']", 'int > 0', "'1' (str)")),
    (lambda m: m.update(shard_bytes=[1, 2]),
     (f"{FIELD}['shard_bytes']", '1 sizes', '[1, 2] (list)')),
    (lambda m: m.update(shard_checksums=['crc']),
     (f"{FIELD}['shard_checksums']", '1 checksums', "'<algorithm>:<hex>'",
      "['crc'] (list)")),
    (lambda m: m.update(params=[]),
     (f"{FIELD}['params']", 'dict', '[] (list)')),
    (lambda m: m['params']['head.weight'].pop('num_classes'),
     (f"{PARAM}['num_classes']", 'missing')),
    (lambda m: m['params']['head.weight'].update(embedding_size=True),
     (f"{PARAM}['embedding_size']", 'int > 0', 'True (bool)')),
    (lambda m: m['params']['head.weight'].update(optimizer=[0, '']),
     (f"{PARAM}['optimizer']", '[key, index]', "[0, '']")),
    (lambda m: m['params']['head.weight'].update(class_ranges=[[0, 9]]),
     (f"{PARAM}['class_ranges']", '[0, 10)', '[[0, 9]]')),
    (lambda m: m['params']['head.weight'].update(
        class_ranges=[[0, 5], [5, 10]]),
     (f"{PARAM}['class_ranges']", '2 ranges', 'one per rank (1)')),
    (lambda m: m.update(format='other'), (FIELD, "format 'other'")),
    (lambda m: m.update(format_version=99),
     ('checkpoint format 99', 'format <= 1')),
])
def test_manifest_errors_name_the_file_and_the_field(trained, edit, named):
    """Named: the file, the field, what it must be and what it holds."""
    stored = _stored_manifest(trained)
    edit(stored)
    with pytest.raises(CheckpointError) as err:
        Manifest.from_dict(stored, 'x.pth')
    assert_mentions(err, 'x.pth', *named)


def test_a_checkpoint_with_a_broken_manifest_is_refused_by_name(trained,
                                                                tmp_path):
    work_dir = _copy(trained[0], tmp_path / 'copy')
    checkpoint = load_file(str(work_dir / 'iter_4.pth'))
    del checkpoint['meta']['mmpfc']['params']['head.weight']['class_ranges']
    # changed on purpose: its checksum is recorded anew
    atomic_save(checkpoint, str(work_dir / 'iter_4.pth'), sidecar=True)
    runner, before = _fresh_runner(tmp_path)
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(work_dir / 'iter_4.pth'))
    assert_mentions(err, str(work_dir / 'iter_4.pth'),
                    f"{PARAM}['class_ranges']", 'missing')
    _assert_unchanged(runner, before)


# ------------------------------------------------ what a load restored
def test_load_result_of_a_same_world_size_load(trained, tmp_path):
    """Saved and loaded on 1 rank: the split matches, the sampler and
    process random states of the saving rank apply."""
    work_dir, state = trained
    runner, _ = _fresh_runner(tmp_path)
    path = str(work_dir / 'iter_4.pth')
    result = ShardedCheckpointer().load(
        runner.model, runner.optim_wrapper, path, load_file(path, mmap=True))
    assert (result.path, result.layout, result.saved_world_size) == (
        path, 'shards', 1)
    assert result.rows == {'head.weight': (0, NUM_CLASSES)}
    assert result.split_matched
    assert sorted(result.sampler_states) == ['head']
    assert torch.equal(result.sampler_states['head']['generator'],
                       state['sampler']['generator'])
    assert sorted(result.rng_state) == ['cuda', 'numpy', 'python', 'torch']
    assert torch.equal(runner.model.head.weight.detach(), state['weight'])


def test_load_result_of_a_merged_file(trained, tmp_path):
    """A merged file has no per-rank state: nothing but the rows apply."""
    from mmpfc.checkpoint.merge import merge_checkpoint
    work_dir, state = trained
    merged = str(tmp_path / 'merged.pth')
    merge_checkpoint(str(work_dir / 'iter_4.pth'), merged)
    runner, _ = _fresh_runner(tmp_path)
    result = ShardedCheckpointer().load(
        runner.model, runner.optim_wrapper, merged, load_file(merged))
    assert (result.layout, result.saved_world_size) == ('inline', 1)
    assert result.rows == {'head.weight': (0, NUM_CLASSES)}
    assert not result.split_matched
    assert result.sampler_states is None and result.rng_state is None
    assert torch.equal(runner.model.head.weight.detach(), state['weight'])
