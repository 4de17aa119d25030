import os
import sys

# Let tests import their helpers (tests/dist_utils.py) and keep thread counts
# small on the 2-core CI machine.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('OMP_NUM_THREADS', '1')

import itertools  # noqa: E402

import pytest  # noqa: E402

_scope_ids = itertools.count()


@pytest.fixture(autouse=True)
def mmpfc_default_scope():
    """Start every test in the ``mmpfc`` scope.

    MMEngine's current default scope is the most recently created one, process
    wide; a test that runs an mmpretrain config would otherwise leave
    ``mmpretrain`` current for the tests after it.
    """
    from mmengine.registry import DefaultScope
    DefaultScope.get_instance(f'mmpfc-test-{next(_scope_ids)}',
                              scope_name='mmpfc')
    yield


@pytest.fixture(autouse=True)
def fresh_visualizers():
    """Forget MMEngine's visualizers after every test.

    A Runner names its visualizer after its timestamp (one-second
    resolution) and reuses an existing instance of that name, with that
    instance's save_dir: two runners built in the same second of one
    process (tests of different files on one pytest-xdist worker) would
    write the second one's scalars into the first one's work dir.
    """
    yield
    from mmengine.visualization import Visualizer
    Visualizer._instance_dict.clear()
