# MS1MV3 (insightface `ms1m-retinaface-t1`): RecordIO train.rec/.idx/property
# and the verification .bin files in one folder. Model configs read the class
# count as `{{_base_.num_classes}}`.
_base_ = ['./face_verification.py']

data_root = 'data/ms1m-retinaface-t1'
num_classes = 93431
num_image = 5179510

train_pipeline = [
    dict(type='LoadImageFromBytes'),  # RGB, what FaceRecognizer expects
    dict(type='mmpretrain.RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='mmpretrain.PackInputs'),
]
train_dataloader = dict(
    batch_size=128,  # per GPU
    num_workers=4,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type='MXFaceDataset',
        data_root=data_root,
        num_classes=num_classes,
        pipeline=train_pipeline))

val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
