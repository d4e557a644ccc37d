"""
The scores of generated answers, each a plain function: the trainers' in-loop evaluations
(finetune.py's exact match, dpo.py's and rl.py's win rate) and evaluate.py's benchmarks call them.

  answer             the model's greedy reply to each conversation, through generate (the one
                     decoder)
  exact_match        share of SFT rows answered exactly (after a normalizer), with the details
  win_rate           how often a rule prefers one model's answers to another's, ties half
  score_generation   exact match, contains, ROUGE-L (rouge-score), BLEU (sacrebleu) and METEOR of
                     answers
  meteor             METEOR (Banerjee & Lavie 2005): unigrams matched exactly, then by Porter stem,
                     F-mean with recall weighted 9 to 1, and a fragmentation penalty for matches
                     scattered in chunks
  standard_errors    the standard error of each mean over its per-item scores
"""
import re

from nanolab.generation import generate
from nanolab.progress import Progress

# how answers compare (evaluate.py)
NORMALIZERS = {'strip': str.strip, 'lower': lambda s: s.strip().lower()}

# -----------------------------------------------------------------------------
# 1) answers, exact match and win rate

def answer(model, tok, conversations, max_new_tokens=32, batch_size=64, progress=False,
           **sampling):
    """The model's reply to each conversation (a list of messages ending before the assistant's
    turn): rendered with the chat template and its generation prompt, decoded in batches until the
    template's end of turn, and stripped of surrounding whitespace. sampling: other generate()
    settings (default greedy). progress: report rows done, rate and ETA on stderr after each batch
    (progress.Progress)."""
    was_training = model.training
    model.eval()
    sampling = {'temperature': 0.0, **sampling}
    # char-level templates end turns with a string instead
    stop_tokens = tok.chat_stop_tokens or ()
    out, shown = [], Progress(len(conversations), 'answering', 'rows') if progress else None
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [tok.render_chat(c, add_generation_prompt=True)[0]
                       for c in conversations[i:i + batch_size]]
            done = generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens,
                            stop_strings=tok.stop_strings, tokenizer=tok, **sampling)
            out += [c.text.strip() for c in done]
            if shown:
                shown.update(len(out))
    finally:
        model.train(was_training)
    return out

def exact_match(model, tok, rows, max_new_tokens=32, batch_size=64, normalize=str.strip):
    """Share of SFT rows whose greedy answer equals the reference, the row's last (assistant)
    message, once both go through `normalize` (default: strip whitespace; synthetic.normalize also
    drops the tasks suite's filler). Returns (score in [0, 1], details: one {'prompt', 'reference',
    'answer', 'match'} per row)."""
    if not rows:
        raise ValueError('exact_match needs at least one row')
    bad = [i for i, r in enumerate(rows) if r['messages'][-1]['role'] != 'assistant']
    if bad:
        raise ValueError(f"row {bad[0]}: the last message is the "
                         f"{rows[bad[0]]['messages'][-1]['role']}'s, not the assistant's "
                         "reference answer that exact match compares against")
    replies = answer(model, tok, [r['messages'][:-1] for r in rows], max_new_tokens, batch_size)
    details = [{'prompt': r['messages'][-2]['content'] if len(r['messages']) > 1 else '',
                'reference': r['messages'][-1]['content'], 'answer': a,
                'match': normalize(a) == normalize(r['messages'][-1]['content'])}
               for r, a in zip(rows, replies)]
    return sum(d['match'] for d in details) / len(details), details

def win_rate(rows, answers, ref_answers, score):
    """How often a judge that applies `score(row, answer)` (higher is better; e.g.
    synthetic.rule_score) prefers `answers` to `ref_answers`, one pair per row: a win counts 1, a
    tie 0.5 (so identical models score 0.5). dpo.py gets both lists from answer(), for the policy
    and for the reference. Returns (rate, details)."""
    if not rows or not len(rows) == len(answers) == len(ref_answers):
        raise ValueError('win_rate needs one answer and one reference answer per row, '
                         f'got {len(rows)} rows, {len(answers)} answers and '
                         f'{len(ref_answers)} reference answers')
    details = [{'answer': a, 'ref_answer': b, 'score': score(r, a), 'ref_score': score(r, b)}
               for r, a, b in zip(rows, answers, ref_answers)]
    wins = sum(1.0 if d['score'] > d['ref_score'] else 0.5 if d['score'] == d['ref_score'] else 0.0
               for d in details)
    return wins / len(details), details

# -----------------------------------------------------------------------------
# 2) text metrics: exact match, contains, ROUGE-L, BLEU, METEOR

def _words(text):
    """METEOR's unigrams: lowercase words and punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())

def meteor(hypothesis, reference, alpha=0.9, beta=3.0, gamma=0.5):
    """METEOR of one hypothesis against one reference (texts, or lists of unigrams). Banerjee &
    Lavie 2005:
      1) align unigrams in stages, each over the words the last left unmatched: exact forms, then
         Porter stems (each word matches at most once; a hypothesis word takes the free reference
         position after the last one matched, if it can, which keeps the chunks few)
      2) P = m / len(hypothesis), R = m / len(reference), Fmean = P R / (alpha P + (1 - alpha) R)
         (alpha 0.9: the paper's 10 P R / (R + 9 P))
      3) chunks = runs of matches adjacent and in the same order in both;
         penalty = gamma (chunks / m)^beta
      4) score = Fmean (1 - penalty). No synonym stage (it needs WordNet's data, which is not here
         offline)."""
    from nltk.stem.porter import PorterStemmer
    hyp = _words(hypothesis) if isinstance(hypothesis, str) else list(hypothesis)
    ref = _words(reference) if isinstance(reference, str) else list(reference)
    stem = PorterStemmer().stem
    matches = {}  # hypothesis position -> reference position
    for key in (lambda w: w, stem):
        free = [j for j in range(len(ref)) if j not in matches.values()]
        for i in (i for i in range(len(hyp)) if i not in matches):
            options = [j for j in free if key(ref[j]) == key(hyp[i])]
            if options:
                last = max((matches[k] for k in matches if k < i), default=-1)
                j = next((j for j in options if j > last), options[0])
                matches[i] = j
                free.remove(j)
    m = len(matches)
    if m == 0:
        return 0.0
    P, R = m / len(hyp), m / len(ref)
    fmean = P * R / (alpha * P + (1 - alpha) * R)
    pairs = sorted(matches.items())
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:])
                     if not (i1 == i0 + 1 and j1 == j0 + 1))
    return fmean * (1 - gamma * (chunks / m) ** beta)

def score_generation(answers, rows, metrics, normalize=str.strip):
    """Per-item scores of answers against each row's references (the best reference counts) and
    headline metrics: exact_match and contains (0/1, after normalize), rouge_l (ROUGE-L F1,
    rouge-score, stemmed), meteor (above), all averaged over items; bleu is sacrebleu's corpus BLEU
    (0-100), with sentence BLEU per item."""
    items = {}
    refs = [[normalize(x) for x in r['references']] for r in rows]
    outs = [normalize(a) for a in answers]
    if 'exact_match' in metrics:
        items['exact_match'] = [float(any(o == x for x in rs)) for o, rs in zip(outs, refs)]
    if 'contains' in metrics:
        items['contains'] = [float(any(x in o for x in rs)) for o, rs in zip(outs, refs)]
    if 'rouge_l' in metrics:
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
        items['rouge_l'] = [max(scorer.score(x, o)['rougeL'].fmeasure for x in rs)
                            for o, rs in zip(outs, refs)]
    if 'meteor' in metrics:
        items['meteor'] = [max(meteor(o, x) for x in rs) for o, rs in zip(outs, refs)]
    headline = {k: sum(v) / len(v) for k, v in items.items()}
    if 'bleu' in metrics:
        import sacrebleu
        # sacrebleu wants k reference streams of equal length; pad with the first reference
        k = max(map(len, refs))
        streams = [[rs[i] if i < len(rs) else rs[0] for rs in refs] for i in range(k)]
        headline['bleu'] = sacrebleu.corpus_bleu(outs, streams).score
        items['bleu_sentence'] = [sacrebleu.sentence_bleu(o, rs).score
                                  for o, rs in zip(outs, refs)]
    return headline, items

GENERATION_METRICS = ('exact_match', 'contains', 'bleu', 'rouge_l', 'meteor')

def standard_errors(items, headline):
    """The standard error of each headline mean over its per-item scores: sample standard deviation
    / sqrt(n)."""
    return {k: (sum((x - headline[k]) ** 2 for x in v) / max(1, len(v) - 1) / len(v)) ** 0.5
            for k, v in items.items() if k in headline}
