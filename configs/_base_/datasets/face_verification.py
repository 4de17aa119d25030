# LFW, CFP-FP and AgeDB-30 pair accuracy (insightface protocol) during
# training. The .bin files ship inside the insightface training-set folders;
# each training-set config points `data_root` at its own folder. One dataset
# holds the three files, one metric reports `lfw/accuracy`, `cfp_fp/...`,
# `agedb_30/...` and `mean_accuracy` (for CheckpointHook's save_best).
# PartialFCHead.predict sets `raw_feat` (un-normalized: flip-sum and XNorm
# as insightface) and `pred_feat` (normalized).
val_dataloader = dict(
    batch_size=128,
    num_workers=2,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='FaceVerificationDataset',
        data_root='data/ms1m-retinaface-t1',
        ann_file=['lfw.bin', 'cfp_fp.bin', 'agedb_30.bin']))
val_evaluator = dict(type='FaceVerificationMetric', feat_key='raw_feat')
val_cfg = dict()

test_dataloader = val_dataloader
test_evaluator = val_evaluator
test_cfg = dict()
