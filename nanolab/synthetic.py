"""
A synthetic instruction suite small enough for a CPU model to learn in minutes, with a held-out
split it never trains on, and preference pairs built from the same tasks: what the post-training
demonstration measures.

    python data.py tasks        # data/tasks/: {train,val}.jsonl (SFT), pref_{train,val}.jsonl
    python data.py tasks_base   # data/tasks_base/: Shakespeare + WikiText-2 valid, char-level (the
                                # base model's pretraining text)

    from nanolab.synthetic import normalize, rule_score
    rule_score(row, 'oefk')     # 1.0 correct and concise, 0.5 correct with filler, 0.0 wrong

The families (one instruction each; words are 3-4 random lowercase letters):
    reverse   "Reverse kfeo"                        -> "oefk"
    upper     "Uppercase kfeo"                      -> "KFEO"
    sort      "Sort kfeo"                           -> "efko"
    add       "Add 1 to 49"                         -> "50"   (0-99: a digit's successor, a carry)
    fact      "The cup is kfeo. What is the cup?"   -> "kfeo"
    last      "Last letter of kfeo"                 -> "o"
Held out: a word belongs to val or to train by a keyed hash of its sorted letters (formats.in_val),
so no held-out word, nor its reversal or any anagram, is ever in a training prompt or answer;
likewise a sum to work out.

Style: an SFT answer is concise ("oefk") or, in 70% of rows, has a filler in front ("Sure! oefk"),
as SFT data written by many hands does; so the SFT model mostly answers with the filler. Exact
match compares answers after `normalize`, which drops the filler, so it measures the task alone.
Preferences encode one rule, concise and correct first (rule_score): the chosen answer is always
the concise correct one; the rejected one is, half and half, the same answer with the filler (style
pairs) or a plausible wrong answer (correctness pairs: the word unreversed, only its first letter
capitalized, two letters out of order, a sum off by one, another word, the first letter). A model
that learns them answers without the filler, which the rule prefers to the SFT model's answers.
"""
import random
import string

from nanolab.formats import in_val

# of the generator: bump it when a change alters the rows, so data.py remakes them
VERSION = 2
FILLER = 'Sure! '
CHATTY_SHARE = 0.7                 # share of SFT answers with the filler
VAL_SHARE = 0.2                    # share of words (and number pairs) held out
SIZES = {'train': 20000, 'val': 500, 'pref_train': 10000, 'pref_val': 500}  # rows per file
NOUNS = ('cup', 'pin', 'box', 'key', 'hat', 'map', 'jar', 'pen')
FAMILIES = ('reverse', 'upper', 'sort', 'add', 'fact', 'last')
# every task and the chat template's text markers
ALPHABET = string.ascii_letters + string.digits + ' .,:;?!+=\'\n'

def _held_out(key, seed):
    return in_val(key.encode(), VAL_SHARE, seed)

def _word(rng, val, seed):
    """A random 3-4 letter word of the given split (rejection sampling: 1 in 5 draws is held
    out)."""
    while True:
        w = ''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 4)))
        # by its letters: anagrams (reversed, sorted) go along
        if _held_out(''.join(sorted(w)), seed) == val:
            return w

def _shuffle_two(s, rng):
    """s with two of its (distinct) letters swapped: a near miss."""
    i, j = rng.sample(range(len(s)), 2)
    t = list(s)
    t[i], t[j] = t[j], t[i]
    return ''.join(t)

def example(rng, family, val, seed):
    """(instruction, answer, plausible wrong answer) for one task of `family`, from the val or the
    train split."""
    w = _word(rng, val, seed)
    if family == 'reverse':
        task = f'Reverse {w}', w[::-1], w
    elif family == 'upper':
        task = f'Uppercase {w}', w.upper(), w.capitalize()
    elif family == 'sort':
        a = ''.join(sorted(w))
        task = f'Sort {w}', a, _shuffle_two(a, rng)
    elif family == 'add':
        while True:  # held out by the pair of numbers
            x, y = rng.randint(0, 99), 1
            if _held_out(f'{y}+{x}', seed) == val:
                break
        task = f'Add {y} to {x}', str(x + y), str(x + y + rng.choice((-1, 1)))
    elif family == 'fact':
        # one fact: with two ("cup is kfeo, pin is zux. What is pin?") our 4-layer model had
        # learned the binding for only 6% of held-out prompts after 1200 steps, whatever the order
        # and the word lengths
        n, v = rng.choice(NOUNS), _word(rng, val, seed)
        task = f'The {n} is {w}. What is the {n}?', w, v
    elif family == 'last':
        task = f'Last letter of {w}', w[-1], w[0]
    else:
        raise ValueError(f'unknown task family {family!r}; use one of {FAMILIES}')
    instruction, answer, wrong = task
    # e.g. a palindrome unreversed
    return instruction, answer, wrong if wrong != answer else answer + answer[-1]

def generate(n, val, seed, families=FAMILIES):
    """n (instruction, answer, wrong) triples, families taking turns, deterministic in (n, val,
    seed)."""
    rng = random.Random(f'{seed}-{"val" if val else "train"}')
    return [example(rng, families[i % len(families)], val, seed) for i in range(n)]

def sft_row(instruction, answer, chatty):
    return {'messages': [{'role': 'user', 'content': instruction},
                         {'role': 'assistant', 'content': FILLER + answer if chatty else answer}]}

def pref_row(instruction, answer, wrong, style_pair):
    return {'prompt': [{'role': 'user', 'content': instruction}], 'chosen': answer,
            'rejected': FILLER + answer if style_pair else wrong}

def normalize(answer):
    """An answer without surrounding whitespace and without the filler: what exact match
    compares."""
    answer = answer.strip()
    return answer[len(FILLER):].strip() if answer.startswith(FILLER) else answer

def rule_score(row, answer):
    """The rule the preferences encode: 1.0 = correct and concise, 0.5 = correct with the filler,
    0.0 = wrong. row: a preference row (its `chosen` is the concise correct answer) or an SFT row
    (its last message)."""
    gold = normalize(row['chosen'] if 'chosen' in row else row['messages'][-1]['content'])
    if normalize(answer) != gold:
        return 0.0
    return 1.0 if answer.strip() == gold else 0.5

# -----------------------------------------------------------------------------
# the datasets: data.py writes them (`python data.py tasks|tasks_base`)

# tasks_base, the base model's pretraining text: Shakespeare and Wikipedia (WikiText-2 valid, for
# its digits: a base that never saw a digit kept them near its random init, and LoRA, which cannot
# train the embeddings, then never learned the add family: 0% after 900 steps)
BASE_SOURCES = ('shakespeare', 'wikitext2_valid')

def settings(name, seed, val_fraction):
    """What a prepared tasks or tasks_base folder was made from: data.py makes it again when these
    change."""
    if name not in ('tasks', 'tasks_base'):
        raise ValueError(f'unknown tasks dataset {name!r}; use tasks or tasks_base')
    return {'name': name, 'seed': seed, 'version': VERSION,
            'val_fraction': val_fraction if name == 'tasks_base' else VAL_SHARE,
            **({'sizes': SIZES, 'families': FAMILIES, 'chatty': CHATTY_SHARE} if name == 'tasks'
               else {})}

def rows(seed):
    """The tasks dataset: {'train', 'val': SFT rows, 'pref_train', 'pref_val': preference pairs}.
    The pairs are other draws of the same splits; a fixed-seed rng picks the styles."""
    rng, files = random.Random(seed), {}
    for split in ('train', 'val'):
        files[split] = [sft_row(i, a, rng.random() < CHATTY_SHARE)
                        for i, a, _ in generate(SIZES[split], split == 'val', seed)]
        triples = generate(SIZES[split] + SIZES['pref_' + split], split == 'val',
                           seed)[SIZES[split]:]
        files['pref_' + split] = [pref_row(i, a, w, rng.random() < 0.5) for i, a, w in triples]
    return files
