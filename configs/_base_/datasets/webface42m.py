# WebFace42M (cleaned WebFace260M): same layout as MS1MV3; if its folder lacks
# lfw/cfp_fp/agedb_30.bin, copy them from another set's folder.
_base_ = ['./ms1mv3.py']

data_root = 'data/WebFace42M'
num_classes = 2059906
num_image = 42474557

train_dataloader = dict(
    dataset=dict(data_root=data_root, num_classes=num_classes))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
