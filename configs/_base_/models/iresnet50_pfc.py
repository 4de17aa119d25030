# insightface r50: IResNet-50, 112x112 RGB input in [-1, 1], 512-d embedding;
# ArcFace (s=64, m=0.5) on the sharded head. Training configs set
# `num_classes` (the dataset's) and `sample_rate` (1.0: model parallel,
# < 1: Partial FC).
model = dict(
    type='FaceRecognizer',
    backbone=dict(type='IResNet', depth=50, embedding_size=512, dropout=0.0),
    head=dict(
        type='PartialFCHead',
        num_classes=93431,
        in_channels=512,
        sample_rate=1.0,
        loss=dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5,
                  m3=0.0)))
