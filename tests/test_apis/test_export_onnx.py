"""tools/deploy/export_onnx.py: the ONNX embedding net matches PyTorch."""
import numpy as np
import onnxruntime
import pytest
import torch
from helpers import load_tool
from mmengine.config import Config
from tiny_training import calibrate_bn

from mmpfc.apis import export_onnx, onnx_max_abs_diff
from mmpfc.apis.export import EmbeddingNet
from mmpfc.registry import MODELS


def face_model(backbone):
    cfg = dict(type='FaceRecognizer', backbone=backbone)
    return cfg, calibrate_bn(MODELS.build(cfg))


def test_tool_exports_mobilefacenet_with_dynamic_batch(tmp_path, capsys):
    cfg, model = face_model(dict(type='MobileFaceNet'))
    ckpt, out = str(tmp_path / 'mbf.pth'), str(tmp_path / 'mbf.onnx')
    torch.save(dict(meta=dict(cfg=Config(dict(model=cfg)).pretty_text),
                    state_dict=model.state_dict()), ckpt)
    main = load_tool('deploy', 'export_onnx.py').main
    assert main([ckpt, out]) == 0
    printed = capsys.readouterr().out
    print(printed)
    diff = float(printed.split('max abs diff')[1])
    assert diff < 1e-4
    session = onnxruntime.InferenceSession(
        out, providers=['CPUExecutionProvider'])
    (inp, ), (outp, ) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:]) == ('input', [3, 112, 112])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    for batch in (1, 5):
        images = torch.rand(batch, 3, 112, 112) * 2 - 1
        got = session.run([outp.name], {'input': images.numpy()})[0]
        with torch.no_grad():
            expected = EmbeddingNet(model)(images).numpy()
        assert got.shape == (batch, 512)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('dynamic', [True, False])
def test_iresnet_export(tmp_path, dynamic):
    _, model = face_model(dict(type='IResNet', depth=18, embedding_size=64))
    path = str(tmp_path / 'r18.onnx')
    export_onnx(model, path, dynamic_batch=dynamic)
    images = torch.rand(3 if dynamic else 1, 3, 112, 112) * 2 - 1
    diff = onnx_max_abs_diff(model, path, images)
    print(f'IResNet-18 (dynamic={dynamic}) onnxruntime vs PyTorch: max abs '
          f'diff {diff:.3e}')
    assert diff < 1e-4
