# CPU demo of MagFace on 2 processes (a few minutes on 2 cores):
#   bash tools/dist_train.sh configs/margins/mbf_magface_demo_cpu.py 2
# configs/pfc/mbf_pfc0.1_demo_cpu.py (a reduced MobileFaceNet learning 1,000
# synthetic identities on a Partial FC head, sample rate 0.1) with the margin
# of configs/margins/r50_magface_ms1mv3.py.
_base_ = ['../pfc/mbf_pfc0.1_demo_cpu.py']

model = dict(
    head=dict(
        loss=dict(
            _delete_=True, type='MagFaceLoss', s=64.0, l_a=10.0,
            u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True)))
