"""Test set-up: import the flat scripts from the repo root, and read data offline from the
shared mirror next to the repo (SPEC.md, "Offline data"). Values already set win."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_DATA = os.path.abspath(os.path.join(ROOT, '..', 'shared', 'data'))
os.environ.setdefault('NANOLAB_DATA_MIRROR', SHARED_DATA)
os.environ.setdefault('TIKTOKEN_CACHE_DIR', os.path.join(SHARED_DATA, 'tiktoken_cache'))
