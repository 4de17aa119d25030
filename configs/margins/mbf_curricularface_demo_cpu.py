# CPU demo of CurricularFace on 2 processes (a few minutes on 2 cores):
#   bash tools/dist_train.sh configs/margins/mbf_curricularface_demo_cpu.py 2
# configs/pfc/mbf_pfc0.1_demo_cpu.py (a reduced MobileFaceNet learning 1,000
# synthetic identities on a Partial FC head, sample rate 0.1) with the margin
# of configs/margins/r50_curricularface_ms1mv3.py.
_base_ = ['../pfc/mbf_pfc0.1_demo_cpu.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='CurricularFaceLoss', s=64.0, m=0.5,
            t_alpha=0.01)))
