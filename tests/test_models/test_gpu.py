"""GPU checks: computations on the test device against the CPU's.

Every test here is marked ``cuda`` and takes the ``device`` fixture: the
device named by ``MMPFC_TEST_DEVICE`` (default ``cuda``; the tests skip when
CUDA is unavailable). ``MMPFC_TEST_DEVICE=cpu`` runs the same bodies on the
CPU, where the ones that only mean something on CUDA (synchronization,
cross-device states) skip. ``bash tools/check_gpu.sh [--cpu]`` runs them
(``pytest -m cuda tests/test_gpu.py``).

The references are float64 CPU computations written here with plain torch
ops (normalize, linear, arccos, cross-entropy; the optimizer formulas), or
the same steps on the CPU where the check is that two devices agree.
"""
import os
import socket
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mmpfc  # noqa: F401

pytestmark = pytest.mark.cuda
DEVICE = os.environ.get('MMPFC_TEST_DEVICE', 'cuda')
CPU = torch.device('cpu')


@pytest.fixture
def device() -> torch.device:
    """The device under test (``MMPFC_TEST_DEVICE``)."""
    if DEVICE == 'cuda':
        if not torch.cuda.is_available():
            pytest.skip('CUDA is not available (MMPFC_TEST_DEVICE=cpu runs '
                        'these tests on the CPU)')
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(DEVICE)


@pytest.fixture
def cuda(device) -> torch.device:
    """The device under test, for checks that only mean something on CUDA."""
    if device.type != 'cuda':
        pytest.skip(f'needs CUDA (device under test: {device})')
    return device


@contextmanager
def count_syncs(device: torch.device):
    """Collect the host-device synchronizations of the block (CUDA)."""
    torch.cuda.synchronize(device)
    found = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found.extend(str(w.message).splitlines()[0] for w in caught
                 if 'synchroniz' in str(w.message))
    torch.cuda.synchronize(device)


def close(got, want, rtol):
    """``got`` (any device/dtype) equals the float64 ``want`` within
    ``rtol`` of the largest reference entry."""
    got = got.detach().to(CPU, torch.float64)
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------ fused head
def dense_reference(emb, weight, target_cols, s, m2):
    """Loss and gradients of ArcFace over ``weight``'s rows, in float64."""
    e = emb.detach().to(CPU, torch.float64).requires_grad_(True)
    w = weight.detach().to(CPU, torch.float64).requires_grad_(True)
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()
    onehot = F.one_hot(target_cols, w.shape[0]).bool()
    theta = torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    logits = torch.where(onehot, torch.cos(theta + m2), cos) * s
    loss = F.cross_entropy(logits, target_cols)
    loss.backward()
    return loss.detach(), e.grad, w.grad


@pytest.mark.parametrize('sample_rate', [1.0, 0.1])
def test_fused_head_matches_a_float64_cpu_reference(device, sample_rate):
    from mmpfc.models.heads import PartialFCHead
    num_classes, dim, batch, s, m2 = 3000, 64, 48, 64.0, 0.5
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch, ), generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen)
    head = PartialFCHead(num_classes, dim, sample_rate=sample_rate, seed=5,
                         loss=dict(type='CombinedMarginLoss', s=s, m2=m2))
    head = head.to(device)
    with torch.no_grad():
        head.weight.copy_(weight)
    feats = emb.to(device, copy=True).requires_grad_(True)
    loss = head.loss_by_labels(feats, labels.to(device))
    loss.backward()
    popped = head.pop_sampled_gradient()
    if popped is None:
        rows, wgrad = torch.arange(num_classes), head.weight.grad
    else:
        rows, wgrad = popped[0].cpu(), popped[1]
        assert rows.numel() == int(sample_rate * num_classes)
        assert torch.isin(labels, rows).all()  # every positive sampled
    ref_loss, ref_egrad, ref_wgrad = dense_reference(
        emb, weight[rows], torch.searchsorted(rows, labels), s, m2)
    close(loss, ref_loss, 1e-5)
    close(feats.grad, ref_egrad, 1e-4)
    close(wgrad, ref_wgrad, 1e-4)


def test_clamped_cosine_gets_no_gradient_on_device(device):
    """A cosine that rounds above 1 on the device is clamped and gets no
    gradient (on CUDA through the bit mask), as ``cos.clamp(-1, 1)``."""
    from mmpfc.models.heads.fused_margin_softmax import fused_margin_softmax
    from mmpfc.models.losses import CombinedMarginLoss
    gen = torch.Generator().manual_seed(0)
    other = torch.randn(2, 6, generator=gen).to(device)
    for _ in range(2000):  # the fused op's arithmetic and shapes
        emb = torch.randn(1, 6, generator=gen).to(device)
        weight = torch.cat([2.5 * emb, other])
        unit = emb / torch.linalg.vector_norm(emb, dim=1)[:, None]
        cos = torch.mm(weight, unit.t()) * torch.linalg.vector_norm(
            weight, dim=1).reciprocal()[:, None]
        if cos[0].item() > 1.0:
            break
    else:
        pytest.fail('no rounding case found')
    weight.requires_grad_(True)
    feats = emb.clone().requires_grad_(True)
    loss = fused_margin_softmax(feats, weight, None,
                                torch.tensor([1], device=device),
                                CombinedMarginLoss(s=4.0, m2=0.5))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(weight.grad[0].cpu(), torch.zeros(6))
    assert weight.grad[1:].abs().sum() > 0


# -------------------------------------------------------- sparse updates
SPARSE_CASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
]


@pytest.mark.parametrize('optimizer_cls,options', SPARSE_CASES)
def test_sparse_updates_match_the_cpu(device, optimizer_cls, options,
                                      monkeypatch):
    from mmpfc.engine.optimizers import sparse_step
    from mmpfc.models.utils import chunks

    # several chunks per step on every device
    monkeypatch.setitem(chunks.CHUNK_BYTES, device.type, 8 * 16 * 4)
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(300, 16, generator=gen)
    steps = [(torch.randperm(300, generator=gen)[:40].sort()[0],
              torch.randn(40, 16, generator=gen)) for _ in range(5)]
    results = []
    for dev, dtype in ((device, torch.float32), (CPU, torch.float64)):
        param = nn.Parameter(init.to(dev, dtype, copy=True))
        optimizer = optimizer_cls([param], **options)
        for rows, grad in steps:
            sparse_step(optimizer, param, rows.to(dev), grad.to(dev, dtype))
        results.append((param.detach(), optimizer.state[param]))
    (got, got_state), (want, want_state) = results
    close(got, want, 1e-5)
    for key, value in want_state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            close(got_state[key], value.double(), 1e-5)
    assert not torch.equal(want, init.double())  # something was updated


# ---------------------------------------------------- fp16 loss scaling
def amp_run(dev):
    """Three fp16 steps with dynamic loss scaling; the second overflows."""
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    torch.manual_seed(0)
    backbone = nn.Linear(6, 8).to(dev)
    head = PartialFCHead(20, 8, seed=1).to(dev)
    wrapper = PartialFCAmpOptimWrapper(
        dtype='float16', loss_scale=dict(init_scale=16.0),
        optimizer=torch.optim.SGD([*backbone.parameters(),
                                   *head.parameters()], lr=1.0,
                                  momentum=0.9))
    gen = torch.Generator().manual_seed(3)
    scales, changed = [], []
    for step in range(3):
        inputs = torch.randn(4, 6, generator=gen).to(dev)
        labels = torch.randint(0, 20, (4, ), generator=gen).to(dev)
        before = backbone.weight.detach().clone()
        with wrapper.optim_context(backbone):
            feats = backbone(inputs)
        assert feats.dtype == torch.float16
        wrapper.backward(head.loss_by_labels(feats, labels))
        if step == 1:
            backbone.weight.grad[0, 0] = float('inf')
        scales.append(wrapper.loss_scaler.get_scale())
        wrapper.step()
        wrapper.zero_grad()
        changed.append(not torch.equal(backbone.weight.detach(), before))
    return scales, changed, backbone.weight.detach(), head.weight.detach()


def test_fp16_loss_scaling_matches_the_cpu(device):
    got = amp_run(device)
    want = amp_run(CPU)  # CPU fp16 autocast with a CPU GradScaler
    assert got[0] == want[0] == [16.0, 16.0, 8.0]  # the overflow backs off
    assert got[1] == want[1] == [True, False, True]  # and skips the step
    for a, b in zip(got[2:], want[2:]):
        close(a, b.double(), 1e-2)


@pytest.mark.parametrize('center_dtype', ['float16', 'bfloat16'])
def test_replicated_16bit_centers_under_loss_scaling(device, center_dtype):
    """A replicated head's 16-bit centers give a dense 16-bit gradient,
    which GradScaler refuses (fp16) or has no CUDA kernel for (bf16): the
    wrapper unscales it itself; the step matches the CPU's."""
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    from mmpfc.models.heads import MarginSoftmaxHead

    def step(on):
        torch.manual_seed(0)
        head = MarginSoftmaxHead(20, 8, center_dtype=center_dtype).to(on)
        wrapper = PartialFCAmpOptimWrapper(
            dtype='float16', loss_scale=dict(init_scale=16.0),
            optimizer=torch.optim.SGD(head.parameters(), lr=0.5))
        gen = torch.Generator().manual_seed(1)
        feats = torch.randn(4, 8, generator=gen).to(on)
        with wrapper.optim_context(head):
            loss = head.loss_by_labels(feats, torch.arange(4, device=on))
        wrapper.backward(loss)
        wrapper.step()
        return head.weight.detach().cpu().double(), \
            wrapper.loss_scaler.get_scale()
    (got, scale), (want, want_scale) = step(device), step(CPU)
    assert scale == want_scale == 16.0
    close(got, want, 1e-2)


# ---------------------------------------------------- process group
def test_process_group_on_one_rank(device, monkeypatch):
    """NCCL on one GPU (gloo on the CPU): the backend choice, a collective
    and the head's all-gather / reduce-scatter."""
    import torch.distributed as dist

    from mmpfc.models.utils.distributed import _AllGatherWithGrad
    from mmpfc.utils.process_group import init_process_group_for_device
    if dist.is_initialized():
        pytest.skip('a process group exists already')
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv('MMPFC_DIST_BACKEND', raising=False)
    for key, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0',
                           MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    init_process_group_for_device('pytorch')
    try:
        assert dist.get_backend() == ('nccl' if device.type == 'cuda' else
                                      'gloo')
        x = torch.arange(4.0, device=device)
        dist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
        t = torch.randn(3, 5, device=device, requires_grad=True)
        out = _AllGatherWithGrad.apply(t)
        weight = torch.randn(3, 5, device=device)
        (out * weight).sum().backward()
        assert torch.equal(out.detach(), t.detach())
        assert torch.equal(t.grad, weight)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------ host-device syncs
def sync_free_setup(device, wrapper_cls, head_args=None, **wrapper_args):
    from mmpfc.models.heads import PartialFCHead
    torch.manual_seed(0)
    backbone = nn.Linear(32, 64).to(device)
    head = PartialFCHead(20000, 64, sample_rate=0.1, seed=1,
                         **(head_args or {})).to(device)
    wrapper = wrapper_cls(optimizer=torch.optim.SGD(
        [*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9,
        weight_decay=5e-4), **wrapper_args)
    batches = [(torch.randn(48, 32, device=device),
                torch.randint(0, 20000, (48, ), device=device))
               for _ in range(4)]

    def step(i):
        inputs, labels = batches[i]
        with wrapper.optim_context(backbone):
            feats = backbone(inputs)
        wrapper.update_params(head.loss_by_labels(feats, labels))
    return step


def test_head_step_does_not_synchronize(cuda):
    """Forward, backward and the sparse SGD update of a Partial FC step."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    step = sync_free_setup(cuda, PartialFCOptimWrapper)
    step(0)
    step(1)  # warm: generators, pinned buffers, the bit weights
    for i in (2, 3):
        with count_syncs(cuda) as syncs:
            step(i)
        assert syncs == [], syncs


def test_compact_head_step_does_not_synchronize(cuda):
    """bf16 centers (stochastic rounding from the rank's CUDA stream) and
    int8 momentum: still no device read in a step."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    step = sync_free_setup(cuda, PartialFCOptimWrapper,
                           head_args=dict(center_dtype='bfloat16'),
                           center_state_dtype='int8')
    step(0)
    step(1)
    with count_syncs(cuda) as syncs:
        step(2)
    assert syncs == [], syncs


def test_compact_sparse_update_matches_the_cpu(device):
    """bf16 rows (rounded to nearest: no stream) and int8 momentum updated
    on the device and on the CPU agree within one bf16 step."""
    from mmpfc.engine.optimizers import sparse_step
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(200, 64, generator=gen).to(torch.bfloat16)
    steps = [(torch.randperm(200, generator=gen)[:30].sort()[0],
              torch.randn(30, 64, generator=gen)) for _ in range(4)]
    results = []
    for dev in (device, CPU):
        param = nn.Parameter(init.to(dev, copy=True))
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
        for rows, grad in steps:
            sparse_step(optimizer, param, rows.to(dev), grad.to(dev),
                        state_form='int8')
        results.append((param.detach().float().cpu(),
                        optimizer.state[param]['momentum_buffer'].cpu()))
    (got, got_codes), (want, want_codes) = results
    assert (got - want).abs().max() <= want.abs().max() * 2**-7
    assert (got_codes.int() - want_codes.int()).abs().max() <= 1
    assert not torch.equal(want.to(torch.bfloat16), init)


def test_amp_step_reads_the_device_once(cuda):
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    step = sync_free_setup(cuda, PartialFCAmpOptimWrapper,
                           clip_grad=dict(max_norm=5.0))
    step(0)
    step(1)
    with count_syncs(cuda) as syncs:
        step(2)
    assert len(syncs) == 1, syncs  # overflow, scale and norm in one copy


def test_preprocessor_copies_without_synchronizing(cuda):
    from mmpretrain.models import ClsDataPreprocessor
    from mmpretrain.structures import DataSample

    from mmpfc.models.recognizers import FaceDataPreprocessor
    args = dict(mean=[127.5] * 3, std=[127.5] * 3)
    pre = FaceDataPreprocessor(**args).to(cuda)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return dict(
            inputs=[torch.randint(0, 256, (3, 112, 112), generator=gen,
                                  dtype=torch.uint8) for _ in range(8)],
            data_samples=[DataSample().set_gt_label(i) for i in range(8)])
    pre(batch(), True)  # warm: the pinned host blocks
    data = batch()
    expected = ClsDataPreprocessor(**args)(
        dict(inputs=list(data['inputs'])))['inputs']
    with count_syncs(cuda) as syncs:
        out = pre(data, True)
    assert syncs == [], syncs
    torch.testing.assert_close(out['inputs'].cpu(), expected, rtol=1e-6,
                               atol=1e-6)
    assert [s.gt_label.item() for s in out['data_samples']] == list(range(8))


# ------------------------------------------------- label range on CUDA
def test_label_out_of_range_is_reported_one_step_late(cuda):
    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(11, 8).to(cuda)
    emb = torch.randn(2, 8, device=cuda)
    head.loss_by_labels(emb, torch.tensor([0, 11], device=cuda))
    with pytest.raises(ValueError, match=r'\[0, 11\), got \[11\] in the '
                       'previous step'):
        head.loss_by_labels(emb, torch.tensor([0, 1], device=cuda))
    head.loss_by_labels(emb, torch.tensor([-1, 3], device=cuda))
    with pytest.raises(ValueError, match=r'got \[-1\]'):
        head.check_pending_labels()


# ------------------------------------------- sampler state across devices
def test_sampler_state_crosses_device_types(cuda):
    from mmpfc.models.heads import CenterSampler
    on_cpu = torch.tensor([1, 7, 300])
    on_gpu = on_cpu.to(cuda)
    saved = CenterSampler(1000, 0.1, seed=3)
    saved.sample(on_gpu)
    state = saved.state_dict()
    assert state['device'] == 'cuda'
    expected = saved.sample(on_gpu)[0]
    same = CenterSampler(1000, 0.1, seed=3)
    same.load_state_dict(state)
    assert torch.equal(same.sample(on_gpu)[0], expected)  # continues
    draws = []
    for _ in range(2):  # a GPU checkpoint resumed on the CPU
        other = CenterSampler(1000, 0.1, seed=3)
        other.load_state_dict(state)
        draws.append(other.sample(on_cpu)[0])
    restarted = CenterSampler(1000, 0.1, seed=3).sample(on_cpu)[0]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], restarted)
    moved = CenterSampler(1000, 0.1, seed=3)  # a model moved to the GPU
    moved.sample(on_cpu)
    fresh = CenterSampler(1000, 0.1, seed=3).sample(on_gpu)[0]
    assert not torch.equal(moved.sample(on_gpu)[0], fresh)


# ------------------------------------------- sharded save: one host copy
def test_sharded_save_copies_the_shard_to_the_host_once(cuda):
    from mmengine.runner.checkpoint import weights_to_cpu

    from mmpfc.checkpoint.host_copies import lend_host_copies
    from mmpfc.checkpoint.sharded_state import collect_shard
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    model = nn.Module()
    model.head = PartialFCHead(50, 8).to(cuda)
    wrapper = PartialFCOptimWrapper(optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9))
    wrapper.update_params(model.head.loss_by_labels(
        torch.randn(4, 8, device=cuda),
        torch.tensor([1, 2, 30, 49], device=cuda)))
    payload, _ = collect_shard(model, wrapper, 0, 1, 'token')
    entry = payload['params']['head.weight']
    assert torch.equal(entry['weight'], model.head.weight.detach().cpu())
    with lend_host_copies(model, payload):
        # what MMEngine's save_checkpoint does for the main file
        state_dict = weights_to_cpu(model.state_dict())
    assert state_dict['head.weight'] is entry['weight']


# ------------------------------------------------ memory peak per table
def test_memory_peak_is_the_intervals(cuda):
    from mmengine.logging import MessageHub

    from mmpfc.engine.hooks import MemoryTableHook
    lines = []
    runner = SimpleNamespace(rank=0, iter=0, hooks=[],
                             message_hub=MessageHub.get_current_instance(),
                             logger=SimpleNamespace(info=lines.append))
    hook = MemoryTableHook(interval=10, first=10)
    hook.before_train(runner)
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device=cuda)
    del big
    first = hook.log_table(runner, 10)[0]['peak']
    small = torch.empty(8 * 2**20, dtype=torch.uint8, device=cuda)
    second = hook.log_table(runner, 20)[0]['peak']
    del small
    assert first >= 512
    assert second < 512  # the second interval's peak, not the process's


# ------------------------------------------------- fp32 embeddings
def test_embedding_is_fp32_under_the_devices_autocast(device):
    from mmpfc.models.backbones import IResNet
    torch.manual_seed(0)
    model = IResNet(depth=18, embedding_size=16).to(device).train()
    kept = {}
    model.dropout.register_forward_hook(
        lambda mod, args, out: kept.__setitem__('body', out))
    low = torch.float16 if device.type == 'cuda' else torch.bfloat16
    x = torch.randn(4, 3, 112, 112, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=low):
        embedding = model(x)[0]
    assert kept['body'].dtype == low and embedding.dtype == torch.float32
    with torch.no_grad():
        expected = model.features(model.fc(kept['body'].float()))
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-5)


#: JPEG chroma subsampling -> (max, mean) level difference allowed between
#: nvJPEG and OpenCV. Full-resolution colour (4:4:4) differs by the IDCT
#: only; with 4:2:0 (most face sets) libjpeg-turbo smooths the colour
#: planes as it upsamples them and nvJPEG by default does not, which on
#: these colour-noise images gave up to 39 levels, 4.8 on average, with a
#: libjpeg-turbo decode without smoothing (4:4:4: 8 and 1.1).
JPEG_TOLERANCE = {'444': (16, 2.0), '420': (64, 8.0)}


@pytest.mark.parametrize('sampling', sorted(JPEG_TOLERANCE))
def test_jpeg_batch_decodes_on_the_device_like_opencv(device, sampling):
    """nvJPEG (CUDA) against OpenCV on the CPU: JPEG decoders may differ by
    a few levels (IDCT and upsampling choices); the mean stays close. On
    the CPU the device path is OpenCV itself. Prints the rate and the
    differences."""
    import time

    import cv2
    import numpy as np
    factor = getattr(cv2, f'IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}', None)
    if factor is None:
        pytest.skip(f'this OpenCV cannot write {sampling} JPEGs')

    from mmpfc.datasets.encoded_batch import encoded_face_collate
    from mmpfc.models.recognizers.jpeg_decode import JpegDecoder
    rng = np.random.default_rng(0)
    encoded, expected = [], []
    for i in range(128):
        img = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3),
                                            dtype=np.uint8), (5, 5), 0)
        data = cv2.imencode('.jpg', img, [
            cv2.IMWRITE_JPEG_QUALITY, 95,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor])[1]
        encoded.append(dict(img_bytes=data.tobytes(), gt_label=i,
                            flip=bool(i % 2), img_source=f'key {i}'))
        rgb = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
        expected.append(rgb[:, ::-1] if i % 2 else rgb)
    batch = encoded_face_collate(encoded)['inputs']
    decoder = JpegDecoder()
    out = decoder(batch, device)  # warm-up (nvJPEG handles)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        out = decoder(batch, device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    rate = 5 * len(batch) / (time.perf_counter() - start)
    reference = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2)
    diff = (out.cpu().int() - reference.int()).abs()
    print(f'\n{device.type} JPEG decode of 112x112 q95 {sampling} batches '
          f'of 128: {rate:.0f} images/s, {decoder.fallbacks} CPU fallbacks; '
          f'vs OpenCV: max {int(diff.max())} levels, mean '
          f'{float(diff.float().mean()):.2f}')
    assert out.shape == (128, 3, 112, 112) and out.device == device
    assert decoder.fallbacks == 0
    most, mean = JPEG_TOLERANCE[sampling]
    assert diff.max() <= most and diff.float().mean() < mean, (
        diff.max(), diff.float().mean())


class _NumberedImages(torch.utils.data.Dataset):
    """Image i filled with i % 251, labelled i (module level: picklable
    for workers of any start method)."""

    def __len__(self):
        return 4096

    def __getitem__(self, i):
        import numpy as np
        return dict(img=np.full((112, 112, 3), i % 251, np.uint8),
                    gt_label=i)


def test_worker_batches_arrive_pinned_and_intact(device):
    """Workers reuse their shared blocks; with ``pin_memory`` the loader's
    pinning thread receives each batch (copying it out of its block) and
    pins it. Every kept batch holds its own images and labels."""
    from mmpfc.datasets import face_collate
    pin = device.type == 'cuda'
    loader = torch.utils.data.DataLoader(
        _NumberedImages(), batch_size=128, num_workers=2, prefetch_factor=3,
        pin_memory=pin, collate_fn=face_collate)
    held = list(loader)
    for step, batch in enumerate(held):
        labels = torch.arange(step * 128, (step + 1) * 128)
        assert batch['data_samples'].tolist() == labels.tolist()
        pixels = (labels % 251).to(torch.uint8).view(-1, 1, 1, 1)
        assert torch.equal(batch['inputs'], pixels.expand(-1, 3, 112, 112))
        assert batch['inputs'].is_pinned() == pin
