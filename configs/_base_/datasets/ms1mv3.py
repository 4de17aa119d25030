# MS1MV3 (insightface `ms1m-retinaface-t1`): RecordIO train.rec/.idx/property
# and the verification .bin files in one folder. Model configs read the class
# count as `{{_base_.num_classes}}`.
_base_ = ['./face_verification.py']

data_root = 'data/ms1m-retinaface-t1'
num_classes = 93431
num_image = 5179510

# The lean pipeline: decode (RGB, what FaceRecognizer expects), flip in
# place, and face_collate packs the batch into one (B, 3, H, W) uint8 tensor
# and one label tensor; 1.4x (in-process) to 2.7x (in a worker) the
# images/s of mmpretrain's pipeline, same batches (docs/data.md, "Choosing
# the pipeline"). Add augmentations (mmcv/mmpretrain transforms working on
# `img`) before or after the flip. To switch back to mmpretrain's transforms,
# override both:
#   train_dataloader = dict(
#       collate_fn=dict(type='pseudo_collate'),
#       dataset=dict(pipeline=[
#           dict(type='LoadImageFromBytes'),
#           dict(type='mmpretrain.RandomFlip', prob=0.5,
#                direction='horizontal'),
#           dict(type='mmpretrain.PackInputs')]))
train_pipeline = [
    dict(type='LoadImageFromBytes'),
    dict(type='RandomFlipInPlace', prob=0.5),
]
train_dataloader = dict(
    batch_size=128,  # per GPU
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='mmpfc.face_collate'),
    dataset=dict(
        type='MXFaceDataset',
        data_root=data_root,
        num_classes=num_classes,
        pipeline=train_pipeline))

val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
