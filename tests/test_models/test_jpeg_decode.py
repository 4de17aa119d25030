"""Encoded batches decoded on the model's device: the bytes path on the
CPU against OpenCV, the per-image CPU fallback when the device decoder
fails, the error naming the record of bytes no decoder reads."""
import cv2
import numpy as np
import pytest
import torch
from helpers import LogRecords
from messages import assert_mentions

from mmpfc.datasets.encoded_batch import encoded_face_collate
from mmpfc.models.recognizers.jpeg_decode import JpegDecoder


def jpeg(seed, size=(112, 112)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)  # photo-like, compressible
    return cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]


def samples(n=5, flips=(True, False, False, True, False)):
    return [dict(img_bytes=jpeg(i).tobytes(), gt_label=10 + i,
                 flip=flips[i], img_source=f'train.rec, key {i}')
            for i in range(n)]


def test_cpu_bytes_path_matches_opencv_and_flips():
    batch = encoded_face_collate(samples())
    assert torch.equal(batch['data_samples'], torch.arange(10, 15))
    out = JpegDecoder()(batch['inputs'], torch.device('cpu'))
    assert out.shape == (5, 3, 112, 112) and out.dtype == torch.uint8
    for i, flipped in enumerate((True, False, False, True, False)):
        rgb = cv2.cvtColor(cv2.imdecode(jpeg(i), cv2.IMREAD_COLOR),
                           cv2.COLOR_BGR2RGB)
        if flipped:
            rgb = rgb[:, ::-1]
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), rgb), i


def test_device_failures_fall_back_to_the_cpu_per_image():
    """A device decoder that cannot read image 2: the batch call fails,
    each image is tried alone, image 2 is decoded on the CPU and counted."""
    calls = []

    def device_decode(images, device):
        calls.append(len(images))
        if any(img.numel() == len(jpeg(2)) and
               torch.equal(img, torch.from_numpy(jpeg(2))) for img in images):
            raise RuntimeError('nvjpeg: unsupported')
        return [torch.empty(3, 112, 112, dtype=torch.uint8, device=device)
                for _ in images]

    decoder = JpegDecoder(device_decode)
    batch = encoded_face_collate(samples())['inputs']
    with LogRecords() as logs:
        out = decoder(batch, torch.device('meta'))
    assert calls == [5, 1, 1, 1, 1, 1]
    assert decoder.fallbacks == 1
    assert out.shape == (5, 3, 112, 112) and out.device.type == 'meta'
    assert any('1 image' in m and 'CPU' in m and 'train.rec, key 2' in m
               for m in logs), logs


@pytest.mark.parametrize('device', ['cpu', 'meta'])
def test_bytes_no_decoder_reads_name_the_record(device):
    def device_decode(images, device):
        raise RuntimeError('nvjpeg: not a JPEG')

    data = samples()
    data[3]['img_bytes'] = b'\xff\xd8 not really a jpeg'
    batch = encoded_face_collate(data)['inputs']
    with pytest.raises(ValueError) as err:
        JpegDecoder(device_decode)(batch, torch.device(device))
    assert_mentions(err, 'train.rec, key 3', 'cannot decode')


def test_collate_refuses_decoded_samples():
    with pytest.raises(TypeError) as err:
        encoded_face_collate([dict(img=np.zeros((2, 2, 3)), gt_label=1)])
    # what is missing, what is there, and the transform to leave out
    assert_mentions(err, "['img_bytes']", "['gt_label', 'img']",
                    'LoadImageFromBytes')


def test_device_path_on_a_virtual_gpu():
    """The CUDA branch on a virtual GPU (fake CUDA tensors): the decoded
    batch is one uint8 CUDA tensor, flipped on the device, with no read of
    a device value on the way (the decoder itself is stubbed: a virtual GPU
    has no nvJPEG)."""
    from mmpfc.testing import virtual_rank

    def device_decode(images, device):
        assert all(img.device.type == 'cpu' for img in images)
        return [torch.empty(3, 112, 112, dtype=torch.uint8, device=device)
                for _ in images]

    batch = encoded_face_collate(samples())['inputs']
    with virtual_rank(0, 8) as gpu:
        with gpu.phase('decode'):
            out = JpegDecoder(device_decode)(batch, torch.device('cuda'))
    assert (out.device.type, out.dtype, tuple(out.shape)) == (
        'cuda', torch.uint8, (5, 3, 112, 112))
    assert gpu.host_reads_in('decode') == []
