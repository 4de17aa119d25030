# Reproduces the model-parallel column of the insightface arcface_torch
# speed test (its README, "Speed Benchmark"): the
# 3M-identity test of r50_pfc0.1_3m.py with every center of the shard used
# each step (sample rate 1.0).
# Reference on 8x V100-32GB: ~2270 samples/s, ~28.9-30.3 GB per GPU.
_base_ = ['./r50_pfc0.1_3m.py']

model = dict(head=dict(sample_rate=1.0))
