"""GPU-path behaviour that the CPU can check.

The device type of mixed precision comes from the parameters, not from
``torch.cuda.is_available()``; the backend choice is explicit; the CUDA
memory peak is per interval; face backbones give fp32 embeddings under
autocast; the head's sync-free code paths (the bit packing of clamped
cosines, fixed-size center sampling) equal the plain ones (the bit-mask
clamp path of the fused step is tested in test_fused_margin_softmax.py); a
sampler state from
another device type is reseeded with a warning; the face preprocessor
equals mmpretrain's.
"""
import logging
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import mmpfc  # noqa: F401


# ----------------------------------------------------- 1. AMP device type
def fake_cuda_available(monkeypatch):
    """A GPU machine, as far as ``torch.cuda.is_available()`` tells."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)


def test_amp_wrapper_takes_the_device_of_the_parameters(monkeypatch):
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    fake_cuda_available(monkeypatch)
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    start = model.weight.detach().clone()
    wrapper = PartialFCAmpOptimWrapper(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    assert wrapper.device_type == 'cpu' and wrapper.loss_scaler is None
    x = torch.randn(2, 4)
    with wrapper.optim_context(model):
        out = model(x)
    assert out.dtype == torch.bfloat16  # trained in bf16, not silently fp32
    wrapper.update_params(out.float().sum())
    # d sum(x W^T) / dW = column sums of x for every output row
    expected = start - 0.5 * x.sum(0).expand(3, 4)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0,
                               atol=0.02)
    fp16 = PartialFCAmpOptimWrapper(
        dtype='float16', optimizer=torch.optim.SGD(model.parameters(), lr=1))
    assert fp16.loss_scaler is not None
    # a CPU GradScaler, although CUDA is (faked) available: GradScaler has
    # no public device attribute, and a CUDA one scales CPU tensors too
    assert fp16.loss_scaler._device == 'cpu'


def test_amp_wrapper_refuses_parameters_on_two_device_types():
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    params = [nn.Parameter(torch.zeros(2)),
              nn.Parameter(torch.zeros(2, device='meta'))]
    with pytest.raises(ValueError, match=r"one device type, got \['cpu', "
                       r"'meta'\]"):
        PartialFCAmpOptimWrapper(optimizer=torch.optim.SGD(params, lr=1))


def test_amp_step_logs_the_scale_and_norm_it_read():
    """One read per step gives the loss scale used and the clipped norm."""
    from mmengine.logging import MessageHub

    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    wrapper = PartialFCAmpOptimWrapper(
        dtype='float16', loss_scale=8.0, clip_grad=dict(max_norm=1e6),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    hub = MessageHub.get_current_instance()
    with wrapper.optim_context(model):
        loss = model(torch.randn(5, 4)).float().square().sum()
    wrapper.backward(loss)
    wrapper.step()
    norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad.float()) for p in
         model.parameters()]))
    assert hub.get_scalar('train/loss_scale').current() == 8.0
    assert hub.get_scalar('train/grad_norm').current() == pytest.approx(
        norm.item(), rel=1e-6)


# --------------------------------------------------------- 1b. backends
def test_backend_is_explicit_and_overridable(monkeypatch):
    from mmpfc.utils.process_group import choose_backend
    fake_cuda_available(monkeypatch)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.delenv('MMPFC_DIST_BACKEND', raising=False)
    monkeypatch.delenv('SLURM_LOCALID', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert choose_backend() == 'nccl'  # a GPU for this local rank
    assert choose_backend('gloo') == 'gloo'  # the argument wins
    monkeypatch.setenv('MMPFC_DIST_BACKEND', 'gloo')
    assert choose_backend() == 'gloo'  # then the environment
    assert choose_backend('nccl') == 'nccl'
    monkeypatch.delenv('MMPFC_DIST_BACKEND')
    monkeypatch.setenv('LOCAL_RANK', '2')  # no third GPU
    assert choose_backend() == 'gloo'
    monkeypatch.delenv('LOCAL_RANK')
    assert choose_backend() == 'gloo'  # no local rank from a launcher
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert choose_backend() == 'gloo'


def test_nccl_without_cuda_is_refused(monkeypatch):
    import torch.distributed as dist

    from mmpfc.utils.process_group import init_process_group_for_device
    if dist.is_initialized():
        pytest.skip('a process group exists already')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(RuntimeError, match="backend='nccl' needs CUDA"):
        init_process_group_for_device('pytorch', backend='nccl')


# ------------------------------------------------- 2. memory peak per table
class FakeCudaMemory:
    """torch.cuda's memory statistics, driven by the test."""

    def __init__(self):
        self.allocated = 0
        self.peak = 0
        self.resets = 0

    def allocate(self, mb):
        self.allocated += mb * 2**20
        self.peak = max(self.peak, self.allocated)

    def free(self, mb):
        self.allocated -= mb * 2**20

    def reset(self, device=None):
        self.resets += 1
        self.peak = self.allocated

    def install(self, monkeypatch):
        for name, value in dict(
                is_available=lambda: True, is_initialized=lambda: True,
                current_device=lambda: 0,
                get_device_name=lambda *a: 'Fake GPU',
                mem_get_info=lambda *a: (60 * 2**30, 80 * 2**30),
                max_memory_allocated=lambda *a: self.peak,
                memory_reserved=lambda *a: 2 * self.peak,
                reset_peak_memory_stats=self.reset).items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_memory_table_peak_is_the_intervals(monkeypatch):
    from mmengine.logging import MessageHub

    from mmpfc.engine.hooks import MemoryTableHook
    memory = FakeCudaMemory()
    memory.install(monkeypatch)
    lines = []
    runner = SimpleNamespace(rank=0, iter=0, hooks=[],
                             message_hub=MessageHub.get_current_instance(),
                             logger=SimpleNamespace(info=lines.append))
    hook = MemoryTableHook(interval=10, first=10)
    memory.allocate(3000)  # start-up, e.g. the cuDNN benchmark search
    memory.free(3000)
    hook.before_train(runner)
    assert memory.resets == 1  # the first interval starts with training
    memory.allocate(1000)
    memory.allocate(500)
    memory.free(500)
    hook.log_table(runner, 10)
    memory.allocate(200)
    memory.free(200)
    hook.log_table(runner, 20)
    assert memory.resets == 3
    assert 'peak   1500 MB' in lines[0]
    assert 'peak   1200 MB' in lines[1]  # not 1500: the second interval's
    assert 'since the previous table' in lines[1]


# --------------------------------------------------- 3. fp32 embeddings
def body_output(module):
    """Register a hook keeping the output of ``module``."""
    kept = {}
    module.register_forward_hook(
        lambda mod, args, out: kept.__setitem__('out', out))
    return kept


@pytest.mark.parametrize('name', ['iresnet', 'mobilefacenet'])
def test_embedding_is_fp32_under_bf16_autocast(name):
    from mmpfc.models.backbones import IResNet, MobileFaceNet
    torch.manual_seed(0)
    if name == 'iresnet':
        model = IResNet(depth=18, embedding_size=16).eval()
        kept = body_output(model.dropout)

        def head_part(x):
            return model.features(model.fc(x))
    else:
        model = MobileFaceNet(embedding_size=16, blocks=(1, 1, 1, 1),
                              scale=1).eval()
        kept = body_output(model.layers)

        def head_part(x):
            return model.features(model.conv_sep(x))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        embedding = model(x)[0]
    assert kept['out'].dtype == torch.bfloat16  # the body ran in bf16
    assert embedding.dtype == torch.float32
    with torch.no_grad():  # outside autocast: fp32 all through
        expected = head_part(kept['out'].float())
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)


# ------------------------------------------- 4. sync-free paths of the head
def test_bit_mask_round_trip():
    from mmpfc.models.heads.bit_mask import pack_bits, unpack_bits
    gen = torch.Generator().manual_seed(0)
    for width in (1, 7, 8, 13, 64):
        mask = torch.rand(5, width, generator=gen) < 0.3
        bits = pack_bits(mask)
        assert bits.shape == (5, (width + 7) // 8)
        for r in range(5):  # byte j // 8 holds bit j % 8
            for j in range(width):
                bit = (int(bits[r, j // 8]) >> (j % 8)) & 1
                assert bit == int(mask[r, j])
        unpacked = unpack_bits(bits, width)
        assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)


def test_fill_up_sampling_matches_a_reference_draw():
    """Positives plus the best-scored of one uniform draw per row."""
    from mmpfc.models.heads import CenterSampler
    sampler = CenterSampler(num_local=50, sample_rate=0.2, seed=9)
    labels = torch.tensor([3, -1, 17, 3, 49, -1])
    index, remapped = sampler.sample(labels)
    score = torch.rand(50, generator=torch.Generator().manual_seed(9))
    score[[3, 17, 49]] = 2.0
    expected = torch.topk(score, 10)[1].sort()[0]
    assert torch.equal(index, expected)
    assert index[remapped[0]] == 3 and index[remapped[4]] == 49
    assert remapped[1] == remapped[5] == -1


# ------------------------------------------ 5. sampler state across devices
class Records(logging.Handler):

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_sampler_state_of_another_device_type_is_reseeded_with_warning():
    from mmengine.logging import MMLogger

    from mmpfc.models.heads import CenterSampler
    labels = torch.tensor([0, 5])
    # a CUDA (Philox) generator state: 8 bytes seed, 8 bytes offset
    cuda_state = torch.tensor(list(range(16)), dtype=torch.uint8)
    saved = dict(seed=4, device='cuda', generator=cuda_state)
    records = Records()
    logger = MMLogger.get_current_instance()
    logger.addHandler(records)
    try:
        draws = []
        for _ in range(2):
            sampler = CenterSampler(200, 0.25, seed=4)
            sampler.load_state_dict(dict(saved))
            draws.append(sampler.sample(labels)[0])
    finally:
        logger.removeHandler(records)
    restarted = CenterSampler(200, 0.25, seed=4).sample(labels)[0]
    assert torch.equal(draws[0], draws[1])  # deterministic
    assert not torch.equal(draws[0], restarted)  # not the seed's stream
    assert len(records.messages) == 2
    assert 'state from cuda cannot continue on cpu' in records.messages[0]


def test_sampler_state_of_the_same_device_type_continues():
    from mmpfc.models.heads import CenterSampler
    labels = torch.tensor([0, 5])
    first = CenterSampler(200, 0.25, seed=4)
    first.sample(labels)
    state = first.state_dict()
    expected = first.sample(labels)[0]
    resumed = CenterSampler(200, 0.25, seed=4)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(labels)[0], expected)


# ------------------------------------------------- 4b. preprocessor
def test_face_preprocessor_equals_mmpretrains():
    from mmpretrain.models import ClsDataPreprocessor
    from mmpretrain.structures import DataSample

    from mmpfc.models.recognizers import FaceDataPreprocessor
    gen = torch.Generator().manual_seed(0)
    args = dict(mean=[127.5, 120.0, 100.0], std=[127.5, 60.0, 50.0],
                to_rgb=True)

    def batch(shapes):
        return dict(
            inputs=[torch.randint(0, 256, s, generator=gen,
                                  dtype=torch.uint8) for s in shapes],
            data_samples=[DataSample().set_gt_label(i * 7)
                          for i in range(len(shapes))])

    for shapes in ([(3, 8, 8)] * 3, [(3, 8, 8), (3, 6, 8)]):
        data = batch(shapes)
        expected = ClsDataPreprocessor(**args)(
            dict(inputs=list(data['inputs']),
                 data_samples=[s.clone() for s in data['data_samples']]))
        got = FaceDataPreprocessor(**args)(data)
        assert torch.equal(got['inputs'], expected['inputs'])
        assert [s.gt_label.tolist() for s in got['data_samples']] == \
            [[0], [7], [14]][:len(shapes)]


def test_nccl_group_is_made_like_gloo_without_process_wide_changes(
        monkeypatch):
    """NCCL under torchrun: the process is bound to its local rank's GPU
    and the group made from torchrun's environment, as for gloo; the
    multiprocessing start method is left as it was (MMEngine's init_dist
    sets it to spawn for the whole process), and a timeout in seconds is
    taken as such."""
    import multiprocessing
    from datetime import timedelta

    import torch.distributed as dist

    from mmpfc.utils import process_group
    if dist.is_initialized():
        pytest.skip('a process group exists already')
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device',
                        lambda index: calls.append(('set_device', index)))
    monkeypatch.setattr(dist, 'init_process_group',
                        lambda **kw: calls.append(('init', kw)))
    for key, value in dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1',
                           MASTER_ADDR='127.0.0.1', MASTER_PORT='1',
                           TORCHELASTIC_USE_AGENT_STORE='True').items():
        monkeypatch.setenv(key, value)
    before = multiprocessing.get_start_method(allow_none=True)
    process_group.init_process_group_for_device('pytorch', backend='nccl',
                                                timeout=1800)
    assert multiprocessing.get_start_method(allow_none=True) == before
    assert calls == [('set_device', 1), ('init', dict(
        backend='nccl', timeout=timedelta(seconds=1800), rank=1,
        world_size=2))]


def test_nccl_under_slurm_binds_slurms_local_rank(monkeypatch):
    """srun sets no LOCAL_RANK and tools/train.py sets it to 0: every rank
    of a node would take GPU 0; Slurm's local id decides."""
    import torch.distributed as dist

    from mmpfc.utils import process_group
    if dist.is_initialized():
        pytest.skip('a process group exists already')
    bound = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_device', bound.append)
    monkeypatch.setattr(dist, 'init_process_group', lambda **kw: None)
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    for key, value in dict(SLURM_PROCID='5', SLURM_NTASKS='8',
                           SLURM_LOCALID='3', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT='1',
                           TORCHELASTIC_USE_AGENT_STORE='True').items():
        monkeypatch.setenv(key, value)
    train_tool = load_train_tool()
    train_tool.parse_args(['cfg.py', '--launcher', 'slurm'])
    assert 'LOCAL_RANK' not in os.environ  # Slurm's local id decides
    process_group.init_process_group_for_device('slurm', backend='nccl')
    assert bound == [3]
    assert (os.environ['RANK'], os.environ['WORLD_SIZE']) == ('5', '8')


def load_train_tool():
    """tools/train.py as a module."""
    import importlib.util

    from helpers import ROOT
    spec = importlib.util.spec_from_file_location(
        'train_tool', os.path.join(ROOT, 'tools', 'train.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
