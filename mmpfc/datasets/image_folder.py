"""Users' own face images, one sub-folder per identity."""
from __future__ import annotations

from mmpretrain.datasets import CustomDataset

from mmpfc.registry import DATASETS


@DATASETS.register_module()
class FaceImageFolder(CustomDataset):
    """mmpretrain's ``CustomDataset`` plus the ``num_classes`` check.

    ``root/<identity>/<image>``: identities are the sorted sub-folder names,
    numbered from 0 (an ``ann_file`` of ``path label`` lines also works, as
    in ``CustomDataset``). Images are expected already aligned to 112x112;
    ``tools/dataset_converters/folder2rec.py`` packs the same folder into a
    RecordIO file when reading many small files is too slow. mmcv's
    ``LoadImageFromFile`` yields BGR, so set ``to_rgb=True`` in the model's
    data preprocessor (``FaceRecognizer`` expects RGB by default).

    Example::

        train_dataloader = dict(
            batch_size=128, num_workers=4,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(
                type='FaceImageFolder', data_root='data/my_faces',
                num_classes=1000,
                pipeline=[dict(type='LoadImageFromFile'),
                          dict(type='mmpretrain.RandomFlip', prob=0.5),
                          dict(type='mmpretrain.PackInputs')]))
        model = dict(data_preprocessor=dict(to_rgb=True))

    Args:
        num_classes (int, optional): Expected number of identities; raises
            when the folder count or a label disagrees.
        **kwargs: Arguments of ``mmpretrain.datasets.CustomDataset``.
    """

    def __init__(self, *args, num_classes: int | None = None,
                 **kwargs) -> None:
        self.num_classes = num_classes
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        data_list = super().load_data_list()
        if not self.with_label:
            return data_list
        if self.ann_file:  # labels from the file: they must fit
            found = 1 + max(info['gt_label'] for info in data_list)
            fits = self.num_classes is None or found <= self.num_classes
            what = f'labels up to {found - 1} in {self.ann_file}'
        else:  # one class per folder: the count must match
            found = len(self._metainfo['classes'])
            fits = self.num_classes in (None, found)
            what = f'{found} identity folders in {self.img_prefix}'
        if not fits:
            raise ValueError(f'num_classes={self.num_classes} disagrees with '
                             f'the data: {what}')
        if self.num_classes is None:
            self.num_classes = found
        return data_list
