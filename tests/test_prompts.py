"""prompts.py's contracts: the library's size and kinds, each template's variables and example, errors that name
every missing and unknown variable, seeded few-shot picks, and chat templates through the one chat template (the
server renders the same token ids)."""
import json

import pytest

from nanolab import prompts
from nanolab.prompts import TEMPLATES, few_shot, render, variables


def test_library_counts_and_every_example_renders():
    assert len(TEMPLATES) >= 20 and len({t['kind'] for t in TEMPLATES.values()}) >= 5
    assert {t['kind'] for t in TEMPLATES.values()} <= set(prompts.KINDS)
    for name, t in TEMPLATES.items():
        assert set(t['example']) == set(variables(name)), name  # the example fills exactly its variables
        out = render(name, **t['example'])
        assert '{' not in (out if isinstance(out, str) else ''.join(m['content'] for m in out)), name


def test_variables_in_order_and_errors_name_every_mistake():
    assert variables('translate') == ['source', 'target', 'text']  # first appearance; {source} twice counts once
    assert render('translate', source='English', target='French', text='Hi') == \
        'Translate from English to French.\nEnglish: Hi\nFrench:'
    with pytest.raises(ValueError, match="takes source, target, text; missing target, text; unknown lang"):
        render('translate', source='en', lang='fr')
    with pytest.raises(KeyError, match="did you mean sentiment"):
        render('sentimnt', text='x')
    assert render('math_steps', problem='1+1?', cot=True).endswith("Answer: Let's think step by step.")
    assert render('reason_chat', question='Why?', cot=True)[-1]['content'].endswith('then give the answer.')
    with pytest.raises(ValueError, match='no chain-of-thought cue'):
        render('qa', question='x', cot=True)


def test_few_shot_is_seeded(tmp_path):
    rows = [{'question': f'q{i}', 'answer': f'a{i}', 'extra': i} for i in range(20)]
    a, b, c = few_shot(rows, 3, seed=1), few_shot(rows, 3, seed=1), few_shot(rows, 3, seed=2)
    assert a == b and a != c and a.count('Q: ') == 3 and 'extra' not in a
    path = tmp_path / 'shots.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert few_shot(str(path), 3, seed=1) == a  # a dataset file gives the same picks
    assert few_shot(rows, 0) == ''
    with pytest.raises(ValueError, match='k=21'):
        few_shot(rows, 21)
    with pytest.raises(ValueError, match='chat template'):
        few_shot(rows, 2, template='qa_chat')


def test_chat_templates_render_through_the_chat_template():
    from nanolab.tokenizer import TiktokenTokenizer
    tok = TiktokenTokenizer('gpt2')
    msgs = render('persona', persona='a pirate', message='Hello')
    assert [m['role'] for m in msgs] == ['system', 'user'] and 'a pirate' in msgs[0]['content']
    ids = tok.render_chat(msgs, add_generation_prompt=True)[0]
    assert tok.decode(ids).count('Hello') == 1


@pytest.mark.parametrize('text', ['{x.__class__.__init__.__globals__}', '{x:>400000000}', '{}', '{0}', '{x[99]}',
                                  '{x!r}', 'a { b', 'a } b', '{x y}'])
def test_a_template_text_substitutes_plain_names_only(text):
    """A template from a client is read by our own formatter, not str.format: a field that is not a plain {name}
    (an attribute, an index, a position, a format spec, a conversion) or a lone brace is refused by name, before
    anything is filled; no attribute of a value is ever read."""
    with pytest.raises(ValueError, match='is not a template variable'):
        prompts.render_text(text, {'x': 'v', 'y': 'w'})


def test_filling_is_bounded_and_takes_any_variable_name():
    assert prompts.render_text('{{literal}} {x} and {x}', {'x': 'v'}) == '{literal} v and v'
    with pytest.raises(ValueError, match='would be 3,000,000 characters, over 1,000,000'):
        prompts.render_text('{x}{x}{x}', {'x': 'a' * 1_000_000})
    # the keyword form cannot take 'cot' or 'name' as variables; fill's dict can, and names them as unknown
    with pytest.raises(ValueError, match='unknown cot, name'):
        prompts.fill('qa', {'question': 'q', 'cot': 'x', 'name': 'y'})
    assert prompts.fill('qa', {'question': 'q'}) == render('qa', question='q')


def test_few_shot_names_the_example_that_lacks_a_variable():
    rows = [{'question': 'q0', 'answer': 'a0'}, {'answer': 'a1'}]
    with pytest.raises(ValueError, match="example 1 has no question"):
        few_shot(rows, 2, seed=0)
