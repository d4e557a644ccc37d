"""
nanolab/kernels.py: the per-machine choice of the CPU linears' kernel. The rule by hand, the choice probed once
and then read back (the same in every later process), NANOLAB_KERNELS=off, and a saved-choices file of any
content (hypothesis): never an error, always a kernel, the file written anew.
"""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st

from model import GPT, GPTConfig
from nanolab import kernels, quantize


def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(arch='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64,
                         vocab_size=97)).eval()


def test_the_rule_by_hand():
    """Each candidate's times over the best at that row count, summed: the lowest sum wins."""
    # at 1 row a is best (1.0 + 2.0 = 3.0 for a), b: 1.1 + 1.0 = 2.1, c: 2.0 + 1.5 = 3.5
    assert kernels.pick({'a': [1.0, 20.0], 'b': [1.1, 10.0], 'c': [2.0, 15.0]}) == 'b'
    assert kernels.pick({'a': [1.0, 10.0], 'b': [1.1, 10.0]}) == 'a'


def test_shapes_count_each_linear_once():
    m = tiny()
    # per block: q/k/v fused (64 -> 64 + 2 * 32), the output projection, gate/up fused, down; then the head
    hidden = m.config.ffn_hidden
    assert kernels.shapes(m) == sorted([(64, 128, 2), (64, 64, 2), (64, 2 * hidden, 2), (hidden, 64, 2),
                                        (64, 97, 1)])


@pytest.mark.skipif(not kernels.ONEDNN, reason="this PyTorch has no oneDNN linear")
def test_probed_once_then_read_back(tmp_path, monkeypatch):
    path = tmp_path / 'k.json'
    monkeypatch.setenv('NANOLAB_KERNELS', str(path))
    calls = []
    real = kernels.probe
    monkeypatch.setattr(kernels, 'probe', lambda *a, **k: calls.append(1) or real(*a, **k))
    kernel, line = kernels.linear_kernel(tiny())
    assert kernel in kernels.CANDIDATES and 'probe' in line and str(path) in line and calls == [1]
    saved = json.loads(path.read_text())
    (entry,) = saved.values()
    assert entry['kernel'] == kernel and set(entry['ms']) == set(kernels.CANDIDATES)
    # the same shapes again: read, not probed; another dtype is another entry
    assert kernels.linear_kernel(tiny())[0] == kernel and calls == [1]
    kernels.linear_kernel(tiny().bfloat16())
    assert calls == [1, 1] and len(json.loads(path.read_text())) == 2
    # for_inference applies the saved choice
    m = quantize.for_inference(tiny())
    packed = any(isinstance(x, quantize.PackedLinear) for x in m.modules())
    assert packed == kernel.startswith('onednn') and calls == [1, 1]


def test_off_probes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv('NANOLAB_KERNELS', 'off')
    monkeypatch.setattr(kernels, 'probe', lambda *a, **k: pytest.fail('probed'))
    kernel, line = kernels.linear_kernel(tiny())
    assert (kernel, 'not probed' in line) == (('onednn/8', True) if kernels.ONEDNN else ('mkl', False))


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel 'fast'.*mkl, onednn/1, onednn/8"):
        quantize.for_inference(tiny(), pack='fast')


@pytest.mark.skipif(not kernels.ONEDNN, reason="this PyTorch has no oneDNN linear")
@given(content=st.one_of(st.binary(max_size=200),
                         st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=3),
                                      max_leaves=8).map(lambda x: json.dumps(x).encode())))
def test_any_saved_file_gives_a_kernel(content, tmp_path_factory):
    """Whatever the file holds (garbage bytes, any JSON, entries of the wrong kind), the choice is a real kernel
    and the file is valid JSON afterwards, holding it."""
    path = tmp_path_factory.mktemp('k') / 'kernels.json'
    path.write_bytes(content)
    old = os.environ.get('NANOLAB_KERNELS')
    os.environ['NANOLAB_KERNELS'] = str(path)
    try:
        kernel, _ = kernels.linear_kernel(tiny())
    finally:
        os.environ.pop('NANOLAB_KERNELS') if old is None else os.environ.__setitem__('NANOLAB_KERNELS', old)
    assert kernel in kernels.CANDIDATES
    assert kernel in [e['kernel'] for e in json.loads(path.read_text()).values()]


def test_an_oversized_file_is_not_read(tmp_path, monkeypatch):
    path = tmp_path / 'k.json'
    path.write_text(json.dumps({'x': {'kernel': 'mkl', 'pad': 'y' * kernels.MAX_FILE}}))
    monkeypatch.setenv('NANOLAB_KERNELS', str(path))
    kernels.linear_kernel(tiny())
    assert path.stat().st_size < kernels.MAX_FILE and 'x' not in json.loads(path.read_text())
