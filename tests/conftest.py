"""Test set-up: import the flat scripts from the repo root, and read data offline from the
shared mirror next to the repo (NANOLAB_DATA_MIRROR: docs/data.md). Values already set win."""
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import settings

# property tests (tests/test_properties.py): CI draws a fixed set of examples (derandomized), a developer's run
# new ones each time; both bounded so the suite stays within its few minutes
settings.register_profile('ci', derandomize=True, max_examples=40, deadline=None, print_blob=True)
settings.register_profile('dev', max_examples=40, deadline=None, print_blob=True)
settings.register_profile('thorough', max_examples=1000, deadline=None, print_blob=True)  # a bug hunt
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'dev'))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_DATA = os.path.abspath(os.path.join(ROOT, '..', 'shared', 'data'))
os.environ.setdefault('NANOLAB_DATA_MIRROR', SHARED_DATA)
os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED_DATA, 'tiktoken_cache'))
# the kernel probe's choices (nanolab/kernels.py) go to a file of this run's own, not the user's cache
os.environ.setdefault('NANOLAB_KERNELS', os.path.join(tempfile.mkdtemp(prefix='nanolab-kernels-'),
                                                      'kernels.json'))


@pytest.fixture
def one_thread():
    """Tiny matmuls are faster on one thread, and a busy 2-core machine makes 2 threads spin (measured: 130 ms vs
    1 ms per forward). Test files opt in with `pytestmark = pytest.mark.usefixtures('one_thread')`; restored after
    each test so other files keep their settings."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
