"""tools/benchmark_data.py: a config's training pipeline against bare
decoding on a synthetic RecordIO set, the workers a GPU needs, the errors."""
import json
import math
import os

import cv2
import numpy as np
import pytest
from helpers import ROOT, load_tool

from mmpfc.benchmark.data_speed import workers_needed
from mmpfc.benchmark.synthetic_faces import write_synthetic_faces
from mmpfc.datasets import MXFaceDataset

MS1MV3 = os.path.join(ROOT, 'configs/_base_/datasets/ms1mv3.py')
SMALL = ['--num-images', '48', '--num-classes', '6', '--rounds', '2',
         '--num-workers', '0', '--json']


@pytest.fixture(scope='module')
def tool():
    return load_tool('benchmark_data.py')


def run_json(tool, capsys, *argv):
    assert tool.main([MS1MV3, *SMALL, *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize('pipeline', ['config', 'mmpretrain'])
def test_reports_rates_ratio_and_workers(tool, capsys, pipeline):
    out = run_json(tool, capsys, '--pipeline', pipeline,
                   '--samples-per-sec', '662.5')
    assert out['pipeline'] == pipeline and out['synthetic']
    assert (out['num_images'], out['batch_size'], out['threads']) == (
        48, 128, 1)
    assert len(out['pipeline_rates']) == len(out['decode_rates']) == 2
    assert out['pipeline_rate'] == max(out['pipeline_rates']) > 0
    assert out['decode_rate'] == max(out['decode_rates']) > 0
    assert out['ratio'] == pytest.approx(out['pipeline_rate'] /
                                         out['decode_rate'])
    assert out['workers_needed'] == math.ceil(662.5 / out['pipeline_rate'])
    assert 7000 < out['mean_bytes'] < 11000  # MS1MV3-like JPEGs
    assert '--samples-per-sec 662.5' in out['command']


def test_table_and_workers_line(tool, capsys):
    assert tool.main([MS1MV3, *SMALL[:-1], '--samples-per-sec', '1e6']) == 0
    text = capsys.readouterr().out
    assert '| ms1mv3.py (config pipeline) |' in text
    assert '| bare `cv2.imdecode` of the same bytes |' in text
    assert '1,000,000 samples/s per GPU need' in text


def test_one_worker_is_measured_beside_a_worker_that_only_decodes(
        tool, capsys):
    argv = [a if a != '0' else '1' for a in SMALL]  # --num-workers 1
    assert tool.main([MS1MV3, *argv]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['num_workers'] == 1
    assert len(out['worker_floor_rates']) == len(out['pipeline_rates']) == 2
    assert out['worker_floor_rate'] == max(out['worker_floor_rates']) > 0
    assert out['floor_ratio'] == pytest.approx(out['pipeline_rate'] /
                                               out['worker_floor_rate'])
    assert tool.main([MS1MV3, *argv[:-1]]) == 0
    text = capsys.readouterr().out
    assert '| a worker that only decodes them and packs with ' in text
    assert 'x what a worker that only decodes delivers' in text
    in_process = run_json(tool, capsys)
    assert in_process['worker_floor_rates'] == []
    assert in_process['floor_ratio'] is None


def test_user_data_root(tool, capsys, tmp_path):
    write_synthetic_faces(str(tmp_path), num_images=20, num_classes=4)
    out = run_json(tool, capsys, '--data-root', str(tmp_path),
                   '--cfg-options', 'train_dataloader.dataset.num_classes=4')
    assert not out['synthetic'] and out['data_root'] == str(tmp_path)
    assert out['num_images'] == 20


def test_refuses_what_it_cannot_measure(tool, capsys):
    synthetic = os.path.join(ROOT, 'configs/_base_/datasets/synthetic_face.py')
    assert tool.main([synthetic, *SMALL]) == 2
    assert "'SyntheticFaceDataset': the data benchmark reads RecordIO" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match='must be positive'):
        workers_needed(0, 100)
    assert workers_needed(662, 5000) == 1 and workers_needed(5001, 5000) == 2


def test_synthetic_set_reads_back(tmp_path):
    info = write_synthetic_faces(str(tmp_path), num_images=30, num_classes=7)
    ds = MXFaceDataset(data_root=str(tmp_path))
    assert (len(ds), ds.num_classes, ds.image_size) == (30, 7, (112, 112))
    # each identity's images one after the other: 30 over 7 in runs of 4-5
    assert [ds.get_data_info(i)['gt_label'] for i in range(30)] == [
        0] * 5 + [1] * 4 + [2] * 4 + [3] * 5 + [4] * 4 + [5] * 4 + [6] * 4
    sizes = [len(ds.get_data_info(i)['img_bytes']) for i in range(30)]
    assert info['mean_bytes'] == pytest.approx(np.mean(sizes))
    img = cv2.imdecode(np.frombuffer(ds.get_data_info(0)['img_bytes'],
                                     np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (112, 112, 3)
