# CurricularFace (Huang et al., CVPR 2020) on MS1MV3 (93,431 identities,
# 5,179,510 images), IResNet-50, with the setup of
# configs/pfc/r50_mp_ms1mv3.py (all centers used, model parallel, mixed
# precision, 128 per GPU on 8 GPUs, SGD lr 0.1 / wd 5e-4, 20 epochs,
# polynomial decay).
# The authors' margin: s=64, m=0.5, running mean t of the target cosines
# with momentum 0.01.
# docs/margins.md: the margin and how it differs from the official code.
#   bash tools/dist_train.sh configs/margins/r50_curricularface_ms1mv3.py 8
_base_ = ['../pfc/r50_mp_ms1mv3.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='CurricularFaceLoss', s=64.0, m=0.5,
            t_alpha=0.01)))
