"""
Downloads of the named datasets' files: a local mirror first, then a cache, then the network
(streamed, with progress, a timeout, retries and a sha256 check), so the same code runs online and
on machines without internet.

    path = fetch('tinyshakespeare/input.txt', URL, SHA256)  # from $NANOLAB_DATA_MIRROR, the cache
                                                            # (data/_downloads) or the network

Code never needs the network at import time: requests is imported when a download starts.
"""
import hashlib
import os
import sys
import time

# (relpath in the mirror and the download cache, url, sha256). Where a list has several, the first
# is the full upstream file and the rest are subsets that offline mirrors hold instead: whichever
# is on disk is used, and the first is downloaded when none is. Commit-pinned URLs keep the
# checksums valid.
GH, LF = 'https://raw.githubusercontent.com/', \
    'hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30/data/'
TS = 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'
SOURCES = {
    'shakespeare': [('tinyshakespeare/input.txt',
                     GH + 'karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                     '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')],
    # TinyStories (Eldan & Li 2023). Stand-ins: the first train stories, lowercased (the mirror's
    # original-case tinystories_train_head.txt repeats their first 5%, so it is not used), and the
    # first part of valid
    'tinystories_train': [('tinystories/TinyStoriesV2-GPT4-train.txt',
                           TS + 'TinyStoriesV2-GPT4-train.txt', None),
                          ('tinystories/tinystories_train_head_lowercased.txt', None,
                           '30c6f2fac206d82e76b80dbbede28f6b5415c8d8571dde6bfd8226ab41744a2c')],
    'tinystories_val': [('tinystories/TinyStoriesV2-GPT4-valid.txt',
                         TS + 'TinyStoriesV2-GPT4-valid.txt', None),
                        ('tinystories/tinystories_val_subset.txt', None,
                         '5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6')],
    # Stanford Alpaca's 52k rows; the stand-in is 999 Alpaca-format rows
    'alpaca': [('alpaca/alpaca_data.json', GH + 'tatsu-lab/stanford_alpaca/main/alpaca_data.json',
                None),
               ('alpaca/alpaca_en_demo.json', GH + LF + 'alpaca_en_demo.json',
                'bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318')],
    'chat': [('chat/dummy_conversation.json',
              GH + 'lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/data/'
              'dummy_conversation.json',
              '534c5a1079f2eb61ff96633330ce87c4743f5b6d5b1691b44a65920473540470')],
    # harmless-base/test: the one hh-rlhf split stored upstream as a plain blob (the others are Git
    # LFS)
    'hh_rlhf': [('hh-rlhf/harmless-base/test.jsonl.gz',
                 GH + 'anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/'
                 'harmless-base/test.jsonl.gz',
                 'ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03')],
    # WikiText-2's validation split (Merity et al. 2016): Wikipedia prose with numbers, for
    # tasks_base (synthetic.py)
    'wikitext2_valid': [('wikitext-2/valid.txt',
                         GH + 'pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/'
                         'word_language_model/data/wikitext-2/valid.txt',
                         'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8')],
    'dpo_pairs': [('preference/dpo_en_demo.json', GH + LF + 'dpo_en_demo.json',
                   'b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3')],
}

def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

def fetch(relpath: str, url: str, sha256: str = None, also=(), cache_dir: str = None) -> str:
    """The local path of a dataset file: $NANOLAB_DATA_MIRROR/relpath, else cache_dir/relpath
    (default data_dir/_downloads), else downloaded there from url: streamed, with progress, a
    timeout, 3 tries and the sha256 check. also: (relpath, sha256) stand-ins accepted when found on
    disk."""
    mirror, cache_dir = os.environ.get('NANOLAB_DATA_MIRROR'), \
        cache_dir or os.path.join('data', '_downloads')
    for rel, sha in [(relpath, sha256), *also]:
        for path in [os.path.join(root, rel) for root in (mirror, cache_dir) if root]:
            if os.path.isfile(path):
                if sha and _sha256(path) != sha:
                    raise ValueError(f'{path} has the wrong sha256 (expected {sha}): it '
                                     'is damaged or another version; delete it (or fix '
                                     'the mirror) and run again')
                return path
    offline = 'set NANOLAB_DATA_MIRROR to a directory holding ' \
              f"{' or '.join([relpath, *(r for r, _ in also)])}, or connect to the internet"
    import requests  # here: code never needs the network at import time
    path = os.path.join(cache_dir, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(3):
        try:
            with requests.get(url, stream=True, timeout=30) as r, open(path + '.part', 'wb') as f:
                r.raise_for_status()
                total, done, h, t0 = int(r.headers.get('content-length') or 0), 0, \
                    hashlib.sha256(), time.time()
                for block in r.iter_content(1 << 20):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    print(f'\rdownloading {relpath}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, '
                          f'{done / 1e6 / max(1e-3, time.time() - t0):.1f} MB/s', end='',
                          file=sys.stderr)
            print(file=sys.stderr)
            break
        except requests.HTTPError as e:  # the server answered: trying again won't help
            raise ValueError(f'downloading {url} failed ({e}); {offline}') from None
        except requests.RequestException as e:
            if attempt == 2:
                raise ValueError(f'cannot download {url} '
                                 f'({type(e).__name__}); {offline}') from None
            time.sleep(2 ** attempt)  # back off 1 s, then 2 s: a flaky connection often recovers
    if sha256 and h.hexdigest() != sha256:
        os.remove(path + '.part')
        raise ValueError(f'{url} arrived with sha256 {h.hexdigest()}, expected '
                         f'{sha256}: the upstream file changed or the transfer broke; '
                         f'run again, or put a good copy at {path}')
    os.replace(path + '.part', path)
    return path

def fetch_source(key, cache_dir):
    """fetch() for SOURCES[key] -> (local path, the relpath it stands for)."""
    (rel, url, sha), *others = SOURCES[key]
    path = fetch(rel, url, sha, [(r, s) for r, _, s in others], cache_dir)
    return path, next(r for r, _, _ in SOURCES[key] if path.endswith(r))
