# CPU demo of sub-center ArcFace on 2 processes (a few minutes on 2 cores;
# the loss falls from ~43 to ~19):
#   bash tools/dist_train.sh configs/margins/mbf_subcenter_arcface_demo_cpu.py 2
# configs/pfc/mbf_pfc0.1_demo_cpu.py (a reduced MobileFaceNet learning 1,000
# synthetic identities on a Partial FC head, sample rate 0.1: every sampled
# class keeps its 3 sub-centers) with the head of
# configs/margins/r50_subcenter_arcface_ms1mv3.py (K=3, ArcFace s=64, m=0.5).
_base_ = ['../pfc/mbf_pfc0.1_demo_cpu.py']

model = dict(
    head=dict(
        num_subcenters=3,
        loss=dict(
            _delete_=True, type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5,
            m3=0.0)))
