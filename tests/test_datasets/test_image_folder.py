"""FaceImageFolder: mmpretrain's CustomDataset with the num_classes check."""
import pytest
from face_files import make_faces
from messages import assert_mentions

from mmpfc.datasets import FaceImageFolder
from mmpfc.registry import DATASETS

PIPELINE = [dict(type='LoadImageFromFile'),
            dict(type='mmpretrain.RandomFlip', prob=0.5),
            dict(type='mmpretrain.PackInputs')]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    files = make_faces(str(root), counts=(2, 1, 3))
    return root, files


def test_labels_follow_sorted_folders(folder):
    root, files = folder
    ds = DATASETS.build(dict(type='FaceImageFolder', data_root=str(root),
                             num_classes=3, pipeline=PIPELINE))
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.metainfo['classes'] == ('id0', 'id1', 'id2')
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        assert files[info['img_path']][1] == info['gt_label']
    out = ds[5]
    assert out['inputs'].shape == (3, 12, 12)
    assert out['data_samples'].gt_label.tolist() == [2]


def test_num_classes_mismatch(folder, tmp_path):
    root, files = folder
    with pytest.raises(ValueError, match=r'num_classes=4 .* 3 identity'):
        FaceImageFolder(data_root=str(root), num_classes=4)
    assert FaceImageFolder(data_root=str(root)).num_classes == 3
    ann = tmp_path / 'list.txt'
    ann.write_text(''.join(f'{p} {label}\n' for p, (_, label)
                           in files.items()))
    with pytest.raises(ValueError, match=r'num_classes=2 .* labels up to 2'):
        FaceImageFolder(ann_file=str(ann), num_classes=2)
    assert len(FaceImageFolder(ann_file=str(ann), num_classes=5)) == 6


@pytest.mark.parametrize('lines, named', [
    ('{0} 0\n{0} x\n', ('list.txt, line 2', "'{0} x'", '"path label"')),
    ('{0} 0\n\n{0} 1\n', ('list.txt, line 2', "''", '"path label"')),
    ('{0} 0\n{0} -1\n', ('list.txt', 'label -1', '{0}', 'negative')),
    ('', ('list.txt', 'no images')),
])
def test_ann_file_errors_name_file_and_line(folder, tmp_path, lines,
                                            named):
    """Named: the file, the line (its number and text) or the image."""
    root, files = folder
    image = next(iter(files))
    ann = tmp_path / 'list.txt'
    ann.write_text(lines.format(image))
    with pytest.raises(ValueError) as err:
        FaceImageFolder(ann_file=str(ann))
    assert_mentions(err, str(ann), *(part.format(image) for part in named))
