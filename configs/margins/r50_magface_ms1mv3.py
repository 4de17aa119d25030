# MagFace (Meng et al., CVPR 2021) on MS1MV3 (93,431 identities, 5,179,510
# images), IResNet-50, with the setup of configs/pfc/r50_mp_ms1mv3.py (all
# centers used, model parallel, mixed precision, 128 per GPU on 8 GPUs, SGD
# lr 0.1 / wd 5e-4, 20 epochs, polynomial decay).
# The authors' margin: s=64, magnitudes [10, 110] mapped to margins
# [0.45, 0.8], regularizer weight lambda_g=35, easy margin.
# docs/margins.md: the margin and how it differs from the official code.
#   bash tools/dist_train.sh configs/margins/r50_magface_ms1mv3.py 8
_base_ = ['../pfc/r50_mp_ms1mv3.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='MagFaceLoss', s=64.0, l_a=10.0,
            u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True)))
