"""Users' own face images, one sub-folder per identity."""
from __future__ import annotations

import re

from mmengine.fileio import list_from_file
from mmpretrain.datasets import CustomDataset

from mmpfc.registry import DATASETS
from mmpfc.utils.arg_checks import Int, Opt, arg_specs

#: an ``ann_file`` line as ``CustomDataset`` splits it: path, space, label
_ANN_LINE = re.compile(r'.+ [+-]?\d+')


@DATASETS.register_module()
@arg_specs(num_classes=Opt(Int(low=1)))
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
        data_list = self._parse()
        if not self.with_label:
            return data_list
        if self.ann_file:  # labels from the file: they must fit
            self._check_file_labels(data_list)
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

    def _parse(self) -> list[dict]:
        """``CustomDataset``'s list, with the line named when an
        ``ann_file`` line is not ``path label`` (its own error is a bare
        ``invalid literal for int()`` or unpacking error)."""
        try:
            return super().load_data_list()
        except ValueError as err:
            bad = self._bad_line() if self.ann_file and self.with_label \
                else None
            if bad is None:
                raise
            raise bad from err

    def _bad_line(self) -> ValueError | None:
        """The error for the first ``ann_file`` line that is not
        ``path label``, if any (scanned only after parsing failed)."""
        for number, line in enumerate(list_from_file(self.ann_file), 1):
            if not _ANN_LINE.fullmatch(line.strip()):
                return ValueError(f'{self.ann_file}, line {number}: '
                                  f'{line!r} is not "path label" (an '
                                  'integer label after the last space)')
        return None

    def _check_file_labels(self, data_list: list[dict]) -> None:
        """An ``ann_file`` must list images, with class ids >= 0 (``-1``
        would not index the head, yet passes the upper-bound check)."""
        if not data_list:
            raise ValueError(f'{self.ann_file} lists no images')
        for info in data_list:
            if info['gt_label'] < 0:
                raise ValueError(
                    f"{self.ann_file}: label {info['gt_label']} of "
                    f"{info['img_path']} is negative; labels are class ids "
                    'in [0, num_classes)')
