import os
import sys

# Let tests import their helpers (tests/dist_utils.py) and keep thread counts
# small on the 2-core CI machine.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('OMP_NUM_THREADS', '1')
