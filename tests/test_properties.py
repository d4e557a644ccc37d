"""Property tests: sampling settings drawn from their whole valid space (extremes and denormals included) and API
bodies drawn from the API's whole space (every field, any JSON type, unknown fields), each run beside a normal
request. What must hold for every draw: the engine and the server never fail a neighbour (its tokens equal
generate's alone), the server answers 2xx or 4xx (never a 5xx) and serves on. Hypothesis draws the examples
(tests/conftest.py: a fixed set in CI, new ones on a developer's machine)."""
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanolab.decoding import Settings, SettingsError
from nanolab.engine import Engine, NumericalError
from nanolab.events import Event
from nanolab.openai_api import CHAT_FIELDS, COMPLETION_FIELDS
from sample import generate
from test_serve import call, events, serving, two_runs  # tests/ is on sys.path while pytest collects it
from test_sample import PROMPTS, tiny

# tiny and denormal floats: 5e-324 is the smallest double, 1e-45 the smallest float32, both 0 in some dtype
TINY = [5e-324, 1e-320, 1e-300, 1e-45, 1e-40, 1e-38, 1e-10, 9.99e-6, 1e-5]


def unit(lo_open, hi_open):
    """A float in the unit interval, its ends as asked, often one of the extremes."""
    floats = st.floats(0.0, 1.0, exclude_min=lo_open, exclude_max=hi_open, allow_subnormal=True)
    ends = [x for x in TINY + [0.0, 0.5, 0.999999, 1.0] if (x > 0 or not lo_open) and (x < 1 or not hi_open)]
    return st.one_of(st.sampled_from(ends), floats)


@st.composite
def sampling(draw, V):
    """Settings from the whole valid space of Settings.check (the library's ranges, wider than the API's)."""
    beams = draw(st.sampled_from([1, 1, 1, 2, 3]))
    return Settings(
        max_new_tokens=draw(st.integers(0, 12)),
        temperature=draw(st.one_of(st.sampled_from([0.0, 2.0, 50.0] + TINY), st.floats(0.0, 3.0))),
        top_k=draw(st.integers(0, V + 3)), top_p=draw(unit(True, False)), min_p=draw(unit(False, True)),
        repetition_penalty=draw(st.one_of(st.sampled_from([0.01, 1.0, 10.0, 1e3] + TINY[3:]),
                                          st.floats(0.01, 10.0))),
        presence_penalty=draw(st.floats(-2.0, 2.0)), frequency_penalty=draw(st.floats(-2.0, 2.0)),
        num_beams=beams, num_samples=draw(st.integers(1, beams if beams > 1 else 3)),
        length_penalty=draw(st.floats(-3.0, 3.0)), seed=draw(st.integers(0, 2 ** 62)),
        logprobs=draw(st.integers(0, V)), stop_tokens=draw(st.sampled_from([None, (), (1,), (0, 5)])))


@pytest.fixture(scope='module')
def model():
    return tiny('gpt2')


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_valid_settings_leave_the_neighbour_alone(model, data):
    """One request with drawn settings beside a greedy and a seeded neighbour, in the same steps of one engine: the
    engine never raises, the drawn request finishes (every token inside the vocabulary) or fails alone, and both
    neighbours' tokens equal generate's alone."""
    V = model.config.vocab_size
    s = data.draw(sampling(V))
    engine = Engine(model, max_batch=8)
    try:
        drawn = engine.submit(PROMPTS[0], s)
    except SettingsError:
        return  # refused at submit, naming the field: the caller's 4xx
    greedy = engine.submit(PROMPTS[1], Settings(max_new_tokens=10, temperature=0))
    seeded = engine.submit(PROMPTS[2], Settings(max_new_tokens=10, temperature=0.9, top_k=20, seed=4))
    out = {id(r): [] for r in (drawn, greedy, seeded)}
    for _ in range(2000):
        for r in (drawn, greedy, seeded):
            while not r.queue.empty():
                out[id(r)].append(r.queue.get())
        if not engine.busy():
            break
        engine.step()
    assert not engine.busy() and not any(engine.slots)
    got = out[id(drawn)]
    assert all(isinstance(e, NumericalError) for e in got if isinstance(e, Exception))
    assert all(0 <= e.token < V for e in got if isinstance(e, Event) and e.token is not None)
    toks = lambda r: [e.token for e in out[id(r)] if isinstance(e, Event) and e.token is not None]
    assert toks(greedy) == generate(model, PROMPTS[1], 10, temperature=0)[0].tokens
    assert toks(seeded) == generate(model, PROMPTS[2], 10, temperature=0.9, top_k=20, seed=4)[0].tokens


# -----------------------------------------------------------------------------
# the API's whole space, over HTTP

@pytest.fixture(scope='module')
def srv(tmp_path_factory):
    with serving(two_runs(tmp_path_factory.mktemp('runs')), max_batch=8) as s:
        s.want = {}  # the neighbour's expected text, computed once
        yield s


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.text(max_size=12) |
                    st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(TINY + [1e308, -0.0]),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=12)
SHAPE = ['arch', 'positions', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'block_size', 'vocab_size',
         'bias', 'tie_embeddings', 'dropout', 'rope_theta', 'norm_eps']
FIELDS_OF = {  # each endpoint's fields: a drawn body mostly uses these, so that draws get past the first check
    '/v1/completions': sorted(COMPLETION_FIELDS), '/v1/chat/completions': sorted(CHAT_FIELDS),
    '/tokenize': ['model', 'prompt', 'messages', 'template', 'variables', 'cot', 'add_generation_prompt',
                  'continue_final_message'],
    '/detokenize': ['model', 'tokens'], '/v1/templates/render': ['model', 'template', 'text', 'variables', 'cot',
                                                                 'shots'],
    '/v1/attention': ['model', 'prompt', 'layer'], '/v1/inspect': ['model', 'prompt', 'top'],
    '/v1/tokenizers': ['model', 'text'], '/v1/embedding_map': ['model', 'n'], '/v1/shape': SHAPE,
    '/v1/models/load': ['source', 'name'], '/v1/arena/judgments': ['id', 'prompt', 'a', 'b', 'winner', 'ratings',
                                                                     'annotator']}
PLAUSIBLE = {  # values a real client sends, mixed with any JSON
    'model': st.sampled_from(['char', 'bpe', 'nope']), 'prompt': st.sampled_from(['To be', '', 'ROMEO:', [1, 2]]),
    'messages': st.sampled_from([[{'role': 'user', 'content': 'hi'}], [{'role': 'assistant', 'content': 'x'}], []]),
    'max_tokens': st.integers(0, 40), 'temperature': st.sampled_from([0, 0.7, 2] + TINY),
    'top_p': st.sampled_from([1, 0.5] + TINY), 'top_k': st.integers(0, 300), 'n': st.integers(0, 5),
    'num_beams': st.integers(1, 4), 'logprobs': st.integers(0, 25), 'stream': st.booleans(), 'echo': st.booleans(),
    'template': st.sampled_from(['qa', 'summarize', 'nope', 'instruction_concise', 'translate']),
    'text': st.sampled_from(['{x}', 'Q: {question}', '{x.__class__}', '{0}', '{}', '{x[9]}', '{x:>99}', 'plain']),
    'variables': st.dictionaries(st.sampled_from(['question', 'text', 'cot', 'name', 'x', 'k', 'source', 'target']),
                                 st.text(max_size=8) | st.integers(), max_size=3),
    'shots': st.fixed_dictionaries({'examples': st.lists(st.fixed_dictionaries(
        {'question': st.text(max_size=5), 'answer': st.text(max_size=5)}), max_size=3),
        'k': st.one_of(st.integers(-2, 5), JSON), 'seed': st.one_of(st.integers(), JSON)}),
    'stop': st.sampled_from(['\n', ['a', 'b'], [''], 'x' * 40]), 'seed': st.integers(-1, 2 ** 63),
    'response_format': st.sampled_from([{'type': 'json_object'}, {'type': 'text'}, {'type': 'json_schema'}, 'json',
                                        {'type': 'json_schema', 'json_schema': {'schema': {
                                            'type': 'object', 'properties': {'a': {'type': 'boolean'}},
                                            'required': ['a']}}}])
    | st.fixed_dictionaries({'type': st.just('json_schema'), 'json_schema': st.fixed_dictionaries({'schema': JSON})}),
    'tools': st.lists(st.fixed_dictionaries({'type': st.sampled_from(['function', 'x']), 'function': st.one_of(
        st.fixed_dictionaries({'name': st.sampled_from(['f', 'g', 'a b', '']), 'parameters': st.sampled_from([
            {'type': 'object', 'properties': {'n': {'type': 'integer', 'maximum': 3}}, 'required': ['n']},
            {'type': 'objectx'}, {}]) | JSON}), JSON)}), max_size=3) | JSON,
    'tool_choice': st.sampled_from(['auto', 'none', 'required', 'x', {'type': 'function', 'function': {'name': 'f'}},
                                    {'type': 'function', 'function': {'name': 'zz'}}]) | JSON,
    'parallel_tool_calls': st.booleans() | JSON,
    'logit_bias': st.dictionaries(st.sampled_from(['1', '5', '-1', 'x', '99999', '1.5']),
                                  st.sampled_from([1, -100, 100, 101, 1e9, 'x'])) | JSON,
    'grammar': st.sampled_from(['start: "a" | "b"', 'start: (', 'start: ', 'start: /[a-z]+/', 'x' * 99]) | JSON,
    'tokens': st.lists(st.integers(-2, 300), max_size=5), 'layer': st.integers(-1, 3), 'top': st.integers(0, 12),
    'arch': st.sampled_from(['gpt2', 'llama']), 'n_head': st.integers(0, 8), 'n_embd': st.integers(0, 64),
    'n_layer': st.integers(0, 4), 'n_kv_head': st.integers(0, 8),
    'source': st.sampled_from(['char', 'bpe/ckpt.pt', '../char', '/etc', '/etc/passwd', 'nope/x', '', '.', 'char/..']),
    'name': st.sampled_from(['c2', 'x', '../y', '']) | st.text(max_size=70),
    'id': st.text(max_size=5), 'winner': st.sampled_from(['a', 'b', 'tie', 'both_bad', 'x']),
    'annotator': st.text(max_size=5), 'ratings': st.dictionaries(st.sampled_from(['a', 'b']), st.integers(0, 6)),
    'a': st.fixed_dictionaries({'model': st.text(max_size=5), 'text': st.text(max_size=5)}),
    'b': st.fixed_dictionaries({'model': st.text(max_size=5), 'text': st.text(max_size=5),
                                'settings': st.dictionaries(st.text(max_size=3), JSON, max_size=2)}),
}


@st.composite
def requests(draw):
    """(endpoint, body): mostly the endpoint's own fields, now and then one it does not have."""
    path = draw(st.sampled_from(sorted(FIELDS_OF)))
    keys = draw(st.lists(st.sampled_from(FIELDS_OF[path]), max_size=6, unique=True))
    if draw(st.integers(0, 9)) == 0:
        keys.append(draw(st.sampled_from(['nonsense', 'tokens', 'prompt', 'messages'])))
    return path, {k: draw(st.one_of(PLAUSIBLE[k], JSON) if k in PLAUSIBLE else JSON) for k in keys}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_any_body_gets_a_2xx_or_4xx_and_the_neighbour_its_text(srv, request):
    """A drawn body to a drawn endpoint while a neighbour streams a greedy completion: the body gets a 2xx or 4xx
    (a 4xx with OpenAI's error body), never a 5xx, and the neighbour's text equals generate's."""
    path, body = request
    neighbour = {'model': 'char', 'prompt': 'To be', 'max_tokens': 12, 'temperature': 0, 'stream': True}
    if 'text' not in srv.want:
        from nanolab.checkpoint import load_model
        m, tok, _ = load_model(srv.runs_dir + '/char')
        srv.want['text'] = generate(m, tok.encode('To be'), 12, temperature=0.0, tokenizer=tok)[0].text
    got = []
    t = threading.Thread(target=lambda: got.append(call(srv, 'POST', '/v1/completions', neighbour)))
    t.start()
    status, out = call(srv, 'POST', path, raw=json.dumps(body).encode())  # NaN and Infinity as Python writes them
    t.join()
    assert 200 <= status < 500, (path, body, status, out)
    if status >= 400:
        assert isinstance(out, dict) and isinstance(out['error']['message'], str), out
    (nstatus, payload), = got
    evs = events(payload)
    assert nstatus == 200 and evs[-1] == '[DONE]'
    assert ''.join(e['choices'][0]['text'] for e in evs[:-1] if e.get('choices')) == srv.want['text']
