# insightface's ViT-T for faces, from mmpretrain parts: 112x112 RGB in
# [-1, 1], 9x9 patches (12x12 tokens, no class token), 12 layers of width 256
# with 8 heads, drop path 0.1; all tokens flattened into a 512-d embedding
# with BatchNorm (mmpretrain's LinearNeck). Parameter names are mmpretrain's,
# not insightface's. ArcFace by default; training configs set `num_classes`
# and `sample_rate`.
model = dict(
    type='FaceRecognizer',
    backbone=dict(
        type='mmpretrain.VisionTransformer',
        arch=dict(embed_dims=256, num_layers=12, num_heads=8,
                  feedforward_channels=1024),
        img_size=112,
        patch_size=9,
        patch_cfg=dict(padding=0),  # as insightface: 12x12, no padding
        drop_path_rate=0.1,
        with_cls_token=False,
        out_type='raw'),  # (B, 144, 256) tokens, flattened by the neck
    neck=dict(
        type='mmpretrain.LinearNeck',
        in_channels=256 * 12 * 12,
        out_channels=512,
        gap_dim=0,
        norm_cfg=dict(type='BN1d')),
    head=dict(
        type='PartialFCHead',
        num_classes=93431,
        in_channels=512,
        sample_rate=1.0,
        loss=dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5,
                  m3=0.0)))
