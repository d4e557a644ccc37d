"""The README is the front door: its map must list exactly the scripts and modules that exist, its test command must
be what CI runs, and every relative link in it and in the manuals under docs/ must lead somewhere."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the root scripts, in the order a model's life runs through them: the map lists them in this order
LIFECYCLE = ['data.py', 'model.py', 'train.py', 'finetune.py', 'dpo.py', 'reward.py', 'rl.py', 'evaluate.py',
             'sample.py', 'serve.py', 'export.py', 'bench.py']


def read(path):
    return open(os.path.join(ROOT, path), encoding='utf-8').read()


def section(text, title):
    """The body of the '## title' section of a Markdown text, up to the next '## ' heading."""
    assert f'\n## {title}\n' in text, f"README has no '## {title}' section"
    return text.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]


def map_entries():
    """The first cell of every table row in the README's map, in order: `name` of | `name` | ... |."""
    return [re.sub(r'/$', '', m) for m in re.findall(r'^\| `([^`]+)` \|', section(read('README.md'), 'Map'), flags=re.M)]


def test_map_lists_the_root_scripts_in_lifecycle_order():
    entries = map_entries()
    scripts = [e for e in entries if e.endswith('.py') and '/' not in e]
    assert scripts == LIFECYCLE, f"README's map lists the scripts {scripts}, not {LIFECYCLE}"
    for name in entries:
        if not name.startswith('nanolab/'):
            assert os.path.exists(os.path.join(ROOT, name)), f"README's map lists {name}, which does not exist"
    # every folder and file a user would look for is in the map
    listed = set(entries)
    expected = {d for d in ('configs', 'docs', 'web', 'tests', 'assets') if os.path.isdir(os.path.join(ROOT, d))}
    expected |= {f for f in ('requirements.txt', 'requirements-dev.txt', '.ci/run') if os.path.exists(os.path.join(ROOT, f))}
    assert not expected - listed, f"README's map does not list {sorted(expected - listed)}"


def test_map_lists_every_package_module():
    if not os.path.isdir(os.path.join(ROOT, 'nanolab')):
        pytest.skip('no nanolab/ package in this checkout yet')
    entries = map_entries()
    modules = {e for e in entries if e.startswith('nanolab/')}
    present = {f'nanolab/{os.path.basename(p)}' for p in glob.glob(os.path.join(ROOT, 'nanolab', '*.py'))}
    present.discard('nanolab/__init__.py')
    assert not modules - present, f"README's map lists {sorted(modules - present)}, which do not exist"
    assert not present - modules, f"README's map does not list {sorted(present - modules)}"
    assert len(modules) == len([e for e in entries if e.startswith('nanolab/')]), "README's map lists a module twice"
    # with the package in place, the root holds the entry scripts only
    root = {f for f in os.listdir(ROOT) if f.endswith('.py')}
    assert root == set(LIFECYCLE), f"the root holds {sorted(root - set(LIFECYCLE))} beside the entry scripts"


def test_readme_test_command_is_what_ci_runs():
    readme = read('README.md')
    ci = read(os.path.join('.ci', 'run'))
    command = re.search(r'## Run the tests\s+```sh\n(.+?)\n```', readme, flags=re.S).group(1).strip()
    assert '\n' not in command, "README's test command is one line, for a fresh machine to paste"
    steps = [s.strip() for s in command.split('&&')]
    # the last step runs the tests exactly as CI does; the install before it takes the requirement files CI installs
    assert steps[-1] in ci.splitlines(), f"README's test command {steps[-1]!r} is not a line of .ci/run"
    requirements = lambda line: sorted(re.findall(r'-r (\S+)', line))
    ci_install = next(line for line in ci.splitlines() if 'pip install' in line and '-r ' in line)
    ours = next(s for s in steps if s.startswith('pip install'))
    assert requirements(ours) == requirements(ci_install), \
        f"README installs {requirements(ours)} for the tests, CI {requirements(ci_install)}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def prose(text):
    """Markdown without its fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)
    return re.sub(r'`[^`\n]*`', '', text)


def anchors(path):
    """The anchors of a Markdown file's headings, with GitHub's -1, -2, ... for repeated ones."""
    seen, out = {}, set()
    for heading in re.findall(r'^#{1,6} +(.+?) *#*$', re.sub(r'^```.*?^```', '', read(path), flags=re.S | re.M), flags=re.M):
        s = slug(heading)
        out.add(s if s not in seen else f'{s}-{seen[s]}')
        seen[s] = seen.get(s, 0) + 1
    return out


MARKDOWN = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))


@pytest.mark.parametrize('path', MARKDOWN)
def test_relative_links_resolve(path):
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)', prose(read(path))):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:: not this repository's
            continue
        file, _, anchor = target.partition('#')
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, dest)):
            broken.append(f'{target} (no file {dest})')
        elif anchor and (not dest.endswith('.md') or anchor not in anchors(dest)):
            broken.append(f'{target} (no heading #{anchor} in {dest})')
    assert not broken, f"{path} links to {broken}"


def test_readme_links_every_manual():
    docs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))}
    assert docs, "no manuals under docs/"
    linked = {os.path.normpath(t.partition('#')[0]) for t in re.findall(r'\]\((docs/[^)\s]+)\)', prose(read('README.md')))}
    assert not docs - linked, f"README does not link {sorted(docs - linked)}"
