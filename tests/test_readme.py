"""The README's file table is the map new users read: it must list exactly the files that exist."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_file_table_matches_repo():
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    table = readme.split('## Files', 1)[1].split('\n## ', 1)[0]
    listed = {re.sub(r'/$', '', m) for m in re.findall(r'^\| `([^`]+)` \|', table, flags=re.M)}
    for name in listed:
        assert os.path.exists(os.path.join(ROOT, name)), f"README lists {name}, which does not exist"
    # every top-level script and folder a user would look for is in the table
    present = {f for f in os.listdir(ROOT) if f.endswith('.py')}
    present |= {d for d in ('configs', 'web', 'tests', 'assets') if os.path.isdir(os.path.join(ROOT, d))}
    missing = present - listed
    assert not missing, f"README's file table does not list {sorted(missing)}"


def test_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
    command = re.search(r'## Run the tests\s+```sh\n(.+?)\n```', readme, flags=re.S).group(1).strip()
    assert command in ci.splitlines(), f"README's test command {command!r} is not a line of .ci/run"
