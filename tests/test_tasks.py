"""synthetic.py: the tasks suite is deterministic, its held-out split shares no word or sum with the training split,
every row fits the char vocabulary of the base model, and the preference rule scores as documented."""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanolab import datasets
from nanolab import synthetic as tasks
from nanolab.formats import read_preferences, read_sft
from nanolab.tokenizer import CharTokenizer


def words(rows):
    """The lowercase words (3+ letters, not instruction words) and the sums asked for in these SFT rows."""
    text = ' '.join(m['content'] for r in rows for m in r['messages'])
    found = set(re.findall(r'\b[a-z]{3,4}\b', text)) - set(tasks.NOUNS) - {'and', 'letter', 'the'}
    return found | set(re.findall(r'Add \d+ to \d+', text))


def test_prepare_is_deterministic_and_held_out_is_disjoint(tmp_path):
    a = datasets.prepare('tasks', data_dir=str(tmp_path / 'a'))
    b = datasets.prepare('tasks', data_dir=str(tmp_path / 'b'), seed=1337)
    for name in ('train', 'val', 'pref_train', 'pref_val'):
        assert open(os.path.join(a, f'{name}.jsonl')).read() == open(os.path.join(b, f'{name}.jsonl')).read()
    meta = datasets.load_meta(a)
    train, val = read_sft(os.path.join(a, 'train.jsonl')), read_sft(os.path.join(a, 'val.jsonl'))
    assert (len(train), len(val)) == (meta['train_rows'], meta['val_rows']) == (tasks.SIZES['train'], tasks.SIZES['val'])
    # no held-out word or sum appears anywhere in training, though both splits cover every family
    held_out, seen = words(val), words(train)
    assert len(held_out) > 300 and not held_out & seen
    assert {r['messages'][0]['content'].split()[0] for r in val} >= {'Reverse', 'Uppercase', 'Sort', 'Add', 'Last'}
    # about CHATTY_SHARE of the answers carry the filler
    share = sum(r['messages'][-1]['content'].startswith(tasks.FILLER) for r in train) / len(train)
    assert abs(share - tasks.CHATTY_SHARE) < 0.02
    # preference pairs: chosen is always the concise correct answer; none is skipped as identical or empty
    for s in ('pref_train', 'pref_val'):
        pairs = read_preferences(os.path.join(a, f'{s}.jsonl'))
        assert len(pairs) == tasks.SIZES[s]
        assert all(tasks.rule_score(p, p['chosen']) == 1.0 > tasks.rule_score(p, p['rejected']) for p in pairs)
        style = sum(p['rejected'] == tasks.FILLER + p['chosen'] for p in pairs) / len(pairs)
        assert 0.4 < style < 0.6  # half style pairs, half correctness pairs
    assert not words([{'messages': p['prompt']} for p in read_preferences(os.path.join(a, 'pref_val.jsonl'))]) & seen
    # a different seed gives a different suite
    c = datasets.prepare('tasks', data_dir=str(tmp_path / 'c'), seed=1)
    assert open(os.path.join(c, 'val.jsonl')).read() != open(os.path.join(a, 'val.jsonl')).read()


def test_answers_are_right_and_the_alphabet_spells_every_conversation():
    tok = CharTokenizer(chars=''.join(sorted(set(tasks.ALPHABET))))
    for val in (False, True):
        for instruction, answer, wrong in tasks.generate(300, val, 7):
            w, family = instruction.split()[-1], instruction.split()[0]
            expected = {'Reverse': w[::-1], 'Uppercase': w.upper(), 'Sort': ''.join(sorted(w)), 'Last': w[-1:]}.get(family)
            if family == 'Add':
                y, x = map(int, re.findall(r'\d+', instruction))
                expected = str(x + y)
            elif expected is None:  # fact: "The cup is kfeo. What is the cup?"
                expected = re.match(r'The (\w+) is (\w+)\. What is the \1\?$', instruction).group(2)
            assert answer == expected and wrong != answer, instruction
            tok.render_chat(tasks.sft_row(instruction, answer, True)['messages'])  # no char outside the vocabulary


def test_rule_score_and_normalize():
    row = {'prompt': [{'role': 'user', 'content': 'Reverse abc'}], 'chosen': 'cba', 'rejected': 'Sure! cba'}
    assert [tasks.rule_score(row, a) for a in ('cba', ' cba\n', 'Sure! cba', 'abc', 'Sure! abc', '')] == [1, 1, 0.5, 0, 0, 0]
    sft = tasks.sft_row('Reverse abc', 'cba', True)
    assert tasks.rule_score(sft, 'cba') == 1.0 and tasks.normalize('Sure! cba ') == 'cba'


def test_tasks_base_vocabulary_covers_the_suite(tmp_path):
    folder = datasets.prepare('tasks_base', data_dir=str(tmp_path))
    meta = datasets.load_meta(folder)
    assert set(tasks.ALPHABET) <= set(meta['tokenizer']['chars']) and meta['train_tokens'] > 1_500_000
