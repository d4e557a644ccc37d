"""
Model sources that must be refused, and loads that must not hurt the server: each malformed source is a ValueError
naming the problem (load_model; a 400 from POST /v1/models/load), found before anything is built; the server reads
only under runs_dir, --models_dir and the Hugging Face cache, with one message for every other path; a failed load
keeps nothing; a load runs beside the other models' streams.
"""
import json
import os
import pickle
import threading
import time
import weakref
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig
from nanolab import server as server_module
from nanolab.checkpoint import load_model, save_checkpoint
from nanolab.mapped import MappedTensors
from nanolab.tokenizer import CharTokenizer
from test_serve import CHARS, call, serving, two_runs  # tests/ is on sys.path while pytest collects it

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=64)


def tiny_run(path, **args):
    """A run directory whose checkpoint holds a tiny model's weights under model args `args` (the weights' own by
    default)."""
    model = GPT(GPTConfig(**TINY))
    os.makedirs(path, exist_ok=True)
    derived = {'n_kv_head': 0, 'ffn_hidden': 0}  # from the others, as GPTConfig derives them
    save_checkpoint({'model_args': {**asdict(model.config), **derived, **args}, 'model': model.state_dict(),
                     'tokenizer': CharTokenizer(chars=''.join(sorted(CHARS))).spec()}, os.path.join(path, 'ckpt.pt'))
    return str(path)


def tiny_hf(path, config=None, weights=True):
    """A Hugging Face directory of a tiny GPT-2 (config.json overridden by `config`: a dict, where ... drops a key,
    or raw text)."""
    model = GPT(GPTConfig(**TINY))
    model.save_pretrained(str(path))
    if config is not None:
        merged = {**json.load(open(path / 'config.json')), **({} if isinstance(config, str) else config)}
        text = config if isinstance(config, str) else json.dumps({k: v for k, v in merged.items() if v is not ...})
        (path / 'config.json').write_text(text)
    if not weights:
        os.remove(path / 'model.safetensors')
    return str(path)


def bad_sources(d):
    """(source, words its error must hold): every kind of malformed model source."""
    pickled = d / 'pickled'
    tiny_hf(pickled, weights=False)
    with open(pickled / 'pytorch_model.bin', 'wb') as f:  # a pickle that is not tensors: weights_only refuses it
        pickle.dump({'x': threading.Lock}, f, protocol=2)
    missing = d / 'missing'
    tiny_hf(missing)
    from safetensors.torch import load_file, save_file
    sd = load_file(missing / 'model.safetensors')
    save_file({k: v for k, v in sd.items() if 'ln_f' not in k}, missing / 'model.safetensors')
    return [(tiny_run(d / 'zero_heads', n_head=0), 'n_head'),
            (tiny_run(d / 'string_layers', n_layer='2'), 'n_layer'),
            (tiny_run(d / 'float_embd', n_embd=16.5), 'n_embd'),
            (tiny_run(d / 'nan_eps', norm_eps=float('nan')), 'norm_eps'),
            (tiny_run(d / 'unknown_arg', sparsity=2), 'sparsity'),
            (tiny_run(d / 'odd_heads', n_head=3), 'divisible'),
            # 1.7 KB of weights whose model args say 8 x 2048: refused before ~1.6 GB is built
            (tiny_run(d / 'claims_big', n_layer=8, n_embd=2048, n_head=16), 'do not match'),
            (tiny_run(d / 'claims_deep', n_layer=10 ** 9), 'layers'),
            (tiny_run(d / 'too_big', vocab_size=2 ** 40), 'GiB'),
            (tiny_hf(d / 'hf_no_key', {'n_embd': ...}), 'n_embd'),
            (tiny_hf(d / 'hf_bad_json', '{"model_type": "gpt2", '), 'JSON'),
            (tiny_hf(d / 'hf_not_object', '[1, 2]'), 'JSON object'),
            (tiny_hf(d / 'hf_string_heads', {'n_head': 'two'}), 'n_head'),
            (tiny_hf(d / 'hf_zero_heads', {'model_type': 'llama', 'hidden_size': 16, 'num_attention_heads': 0,
                                           'num_hidden_layers': 1, 'intermediate_size': 32}), 'n_head must be an integer of at least 1'),
            (str(pickled), 'not readable'),
            (str(missing), 'lacks')]


def test_load_model_names_what_is_wrong_with_each_malformed_source(tmp_path):
    for source, words in bad_sources(tmp_path):
        with pytest.raises(ValueError) as e:
            load_model(source)
        assert words in str(e.value), (source, str(e.value))


def test_nothing_is_built_before_the_checks(tmp_path, monkeypatch):
    """The model args and the size are checked on a model laid out on the meta device: a checkpoint that claims a
    large model allocates nothing before it is refused."""
    sources = [tiny_run(tmp_path / 'wide', n_layer=8, n_embd=2048, n_head=16),
               tiny_run(tmp_path / 'huge', vocab_size=2 ** 40)]
    built = []
    init = GPT.__init__

    def recording(self, config):
        built.append(torch.empty(0).device.type)  # the device new tensors go to
        init(self, config)
    monkeypatch.setattr(GPT, '__init__', recording)
    for source in sources:
        with pytest.raises(ValueError):
            load_model(source)
    assert built == ['meta', 'meta']


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    """runs/ (served), outside/ (a run no setting names), extra/ (a --models_dir)."""
    base = tmp_path_factory.mktemp('roots')
    runs = two_runs(base / 'runs')
    tiny_run(base / 'outside' / 'run')
    tiny_run(base / 'extra' / 'run')
    os.symlink(base / 'outside' / 'run', runs / 'link_out')          # a link out of runs_dir
    os.makedirs(runs / 'sneaky')
    os.symlink(base / 'outside' / 'run' / 'ckpt.pt', runs / 'sneaky' / 'ckpt.pt')  # a file that links out
    return base


def test_server_loads_only_under_its_directories_with_one_message_for_the_rest(roots):
    runs, outside = roots / 'runs', roots / 'outside'
    with serving(runs, source=runs / 'char', max_models=8) as srv:
        refused = [str(outside / 'run'), str(outside / 'run' / 'ckpt.pt'), str(outside / 'nothing_here'),
                   str(outside), '../outside/run', 'char/../../outside/run', 'link_out', '/etc', '/etc/passwd',
                   str(roots / 'extra' / 'run')]
        messages = set()
        for source in refused:
            status, body = call(srv, 'POST', '/v1/models/load', {'source': source, 'name': 'x'})
            assert status == 400, (source, body)
            messages.add(body['error']['message'].replace(repr(source[:200]), 'SOURCE'))
        assert len(messages) == 1, messages  # absent, a directory or a file: the same answer
        status, body = call(srv, 'POST', '/v1/models/load', {'source': 'sneaky', 'name': 'x'})
        assert status == 400 and 'link that leads out' in body['error']['message']
        assert call(srv, 'POST', '/v1/models/load', {'source': 'bpe'})[0] == 200  # under runs_dir
        srv.model_roots.append(os.path.realpath(roots / 'extra'))  # --models_dir=extra
        got = call(srv, 'POST', '/v1/models/load', {'source': 'run', 'name': 'r1'})
        assert got[0] == 200, got
        assert call(srv, 'POST', '/v1/models/load', {'source': str(roots / 'extra' / 'run'), 'name': 'r2'})[0] == 200


def test_server_answers_400_for_each_malformed_source_and_keeps_serving(roots, tmp_path_factory):
    bad = tmp_path_factory.mktemp('bad')
    cases = bad_sources(bad)
    with serving(roots / 'runs', source=roots / 'runs' / 'char') as srv:
        srv.model_roots.append(os.path.realpath(bad))
        for source, words in cases:
            status, body = call(srv, 'POST', '/v1/models/load', {'source': source, 'name': 'x'})
            assert status == 400 and words in body['error']['message'], (source, status, body)
        assert call(srv, 'POST', '/v1/completions', {'prompt': 'ab', 'max_tokens': 2})[0] == 200


def test_a_failed_load_keeps_nothing_it_read(roots, tmp_path, monkeypatch):
    """The tensors a load read before it failed are freed when it answers, not at the next full garbage collection
    (a traceback's frames hold them in a cycle): the loader clears them."""
    import gc
    source = bad_sources(tmp_path)[-1][0]  # a HF directory that lacks one tensor: the others are read first
    read = []
    get = MappedTensors.__getitem__

    def tracked(self, name):
        t = get(self, name)
        read.append(weakref.ref(t))
        return t
    monkeypatch.setattr(MappedTensors, '__getitem__', tracked)
    with serving(roots / 'runs', source=roots / 'runs' / 'char') as srv:
        srv.model_roots.append(os.path.realpath(tmp_path))
        gc.disable()  # only reference counts may free them
        try:
            assert call(srv, 'POST', '/v1/models/load', {'source': source, 'name': 'x'})[0] == 400
            assert read and all(r() is None for r in read), f"{sum(r() is not None for r in read)} of {len(read)} kept"
        finally:
            gc.enable()


def test_a_load_runs_beside_the_other_models_streams(roots, monkeypatch):
    """A model loads on a thread of its own: a completion on the served model, sent while a (slowed) load runs,
    is answered before the load ends."""
    loading, done = threading.Event(), []
    load = server_module.load_model

    def slow_load(*a, **k):
        loading.set()
        time.sleep(3)
        return load(*a, **k)
    monkeypatch.setattr(server_module, 'load_model', slow_load)
    with serving(roots / 'runs', source=roots / 'runs' / 'char') as srv:
        loader = threading.Thread(target=lambda: done.append(call(srv, 'POST', '/v1/models/load',
                                                                  {'source': 'bpe'})[0]))
        loader.start()
        assert loading.wait(10)
        status, _ = call(srv, 'POST', '/v1/completions', {'prompt': 'ab', 'max_tokens': 4})
        answered_during_load = not done
        loader.join()
        assert status == 200 and answered_during_load and done == [200]
