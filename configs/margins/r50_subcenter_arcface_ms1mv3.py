# Sub-center ArcFace (Deng et al., ECCV 2020) on MS1MV3 (93,431 identities,
# 5,179,510 images), IResNet-50, with the setup of configs/pfc/r50_mp_ms1mv3.py
# (all centers used, model parallel, mixed precision, 128 per GPU on 8 GPUs,
# SGD lr 0.1 / wd 5e-4, 20 epochs, polynomial decay).
# The paper's setting: K=3 sub-centers per class, ArcFace s=64, m=0.5. The
# shard holds (classes, 3 x 512): three times the centers of ArcFace.
# docs/margins.md: the formula, the storage and the cleaning step
# (tools/subcenter_clean.py).
#   bash tools/dist_train.sh configs/margins/r50_subcenter_arcface_ms1mv3.py 8
_base_ = ['../pfc/r50_mp_ms1mv3.py']

model = dict(
    head=dict(
        num_subcenters=3,
        loss=dict(
            _delete_=True, type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5,
            m3=0.0)))
