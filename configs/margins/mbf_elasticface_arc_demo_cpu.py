# CPU demo of ElasticFace-Arc on 2 processes (a few minutes on 2 cores):
#   bash tools/dist_train.sh configs/margins/mbf_elasticface_arc_demo_cpu.py 2
# configs/pfc/mbf_pfc0.1_demo_cpu.py (a reduced MobileFaceNet learning 1,000
# synthetic identities on a Partial FC head, sample rate 0.1) with the margin
# of configs/margins/r50_elasticface_arc_ms1mv3.py.
_base_ = ['../pfc/mbf_pfc0.1_demo_cpu.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='ElasticFaceLoss', s=64.0, m=0.5,
            std=0.05, kind='arc')))
