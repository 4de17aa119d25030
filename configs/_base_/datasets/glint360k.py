# Glint360K (insightface `glint360k`): same layout as MS1MV3.
_base_ = ['./ms1mv3.py']

data_root = 'data/glint360k'
num_classes = 360232
num_image = 17091657

train_dataloader = dict(
    dataset=dict(data_root=data_root, num_classes=num_classes))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
