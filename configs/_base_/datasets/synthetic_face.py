# Synthetic identities generated from the index (SyntheticFaceDataset): no
# files, no decoding, labels spread over all classes. The reference's speed
# test uses 3,000,000 identities; `learnable=True` gives per-identity
# prototypes plus noise for demos that should learn.
num_classes = 3000000
num_image = 1000000

train_dataloader = dict(
    batch_size=128,  # per GPU
    num_workers=2,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type='SyntheticFaceDataset',
        num_classes=num_classes,
        num_samples=num_image,
        image_size=112))
