# insightface mbf: MobileFaceNet (GDC head), 112x112 RGB input in [-1, 1],
# 512-d embedding; the same ArcFace Partial FC head as iresnet50_pfc.py.
# Training configs set `num_classes` and `sample_rate`.
_base_ = ['./iresnet50_pfc.py']

model = dict(
    backbone=dict(_delete_=True, type='MobileFaceNet', embedding_size=512))
