# MS1MV2 (insightface `faces_emore`, MS1M-ArcFace): same layout as MS1MV3.
_base_ = ['./ms1mv3.py']

data_root = 'data/faces_emore'
num_classes = 85742
num_image = 5822653

train_dataloader = dict(
    dataset=dict(data_root=data_root, num_classes=num_classes))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
