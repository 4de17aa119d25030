# ElasticFace-Arc (Boutros et al., CVPRW 2022) on MS1MV3 (93,431 identities,
# 5,179,510 images), IResNet-50, with the setup of
# configs/pfc/r50_mp_ms1mv3.py (all centers used, model parallel, mixed
# precision, 128 per GPU on 8 GPUs, SGD lr 0.1 / wd 5e-4, 20 epochs,
# polynomial decay).
# The authors' margin: s=64, a margin drawn per sample from N(0.5, 0.05).
# Their other settings: ElasticFace-Cos kind='cos', m=0.35, std=0.05;
# ElasticFace-Arc+ plus=True, std=0.0175; ElasticFace-Cos+ kind='cos',
# plus=True, m=0.35, std=0.02.
# docs/margins.md: the margin and how it differs from the official code.
#   bash tools/dist_train.sh configs/margins/r50_elasticface_arc_ms1mv3.py 8
_base_ = ['../pfc/r50_mp_ms1mv3.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='ElasticFaceLoss', s=64.0, m=0.5,
            std=0.05, kind='arc')))
