# AdaFace (Kim et al., CVPR 2022) on MS1MV3 (93,431 identities, 5,179,510
# images), IResNet-50, with the setup of configs/pfc/r50_mp_ms1mv3.py (all
# centers used, model parallel, mixed precision, 128 per GPU on 8 GPUs, SGD
# lr 0.1 / wd 5e-4, 20 epochs, polynomial decay).
# The authors' margin: s=64, m=0.4, h=0.333, norm statistics with
# momentum 0.01.
# docs/margins.md: the margin and how it differs from the official code.
#   bash tools/dist_train.sh configs/margins/r50_adaface_ms1mv3.py 8
_base_ = ['../pfc/r50_mp_ms1mv3.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='AdaFaceLoss', s=64.0, m=0.4, h=0.333,
            t_alpha=0.01)))
