"""MMEngine's checkpoint objects are allowed to ``torch.load`` within a
block only, and the block leaves torch's allow-list as it found it."""
import pickle

import pytest
import torch
from mmengine.logging import HistoryBuffer

from mmpfc.utils.compat import allowing_mmengine_checkpoints


@pytest.fixture
def message_hub_file(tmp_path):
    """A file holding what MMEngine's message hub puts in a checkpoint."""
    path = tmp_path / 'hub.pth'
    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save(dict(message_hub=dict(log_scalars=dict(loss=buffer))), path)
    return path


def test_mmengine_objects_load_within_the_block_only(message_hub_file):
    with allowing_mmengine_checkpoints():
        loaded = torch.load(message_hub_file, weights_only=True)
    assert loaded['message_hub']['log_scalars']['loss'].current() == 1.5
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(message_hub_file, weights_only=True)


def test_the_block_keeps_what_others_allowed():
    allowed = torch.serialization.get_safe_globals
    assert HistoryBuffer not in allowed()
    with torch.serialization.safe_globals([HistoryBuffer]):  # someone's
        with allowing_mmengine_checkpoints():
            assert HistoryBuffer in allowed()
        assert HistoryBuffer in allowed()  # still theirs
        with allowing_mmengine_checkpoints():
            pass
    assert HistoryBuffer not in allowed()
