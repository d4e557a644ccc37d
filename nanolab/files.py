"""
Files that are never left torn, and JSON that browsers can read.

    write_atomic(path, lambda f: torch.save(ckpt, f))  # a temp file, fsynced, renamed over path
    with replacing(path) as tmp: writer.write(tmp)      # the same for a library writing a path
    commit(tmp, path)                                   # or put a finished temp file in place
    write_json(path, obj); write_text(path, text)
    dumps(obj)                                          # json.dumps, NaN and infinities as null
    inside(os.path.realpath(p), roots)                  # is p under one of roots (realpaths)?

A crash, a Ctrl-C or a second writer at any moment leaves either the old file or the new one, never
half of one: the bytes reach the disk (fsync) before the name points at them (os.replace is atomic
on POSIX and Windows). inside and link_out keep the paths a server reads and writes for its clients
inside the directories it was given.
"""
import json
import math
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager


# a temp file or folder of a writer: NAME.PID.TID.tmp (replacing) or NAME.PID.tmp (export.py)
TEMP_NAME = re.compile(r'.+?\.(\d+)(?:\.\d+)?\.tmp')


@contextmanager
def replacing(path):
    """A temp path beside `path`, this process and thread's own, for the caller to write; when the
    block ends without an exception, the file is fsynced and renamed over path; either way no temp
    file is left."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'
    try:
        yield tmp
        commit(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale(folder, quiet_seconds=60):
    """Remove the temp files and folders in folder (NAME.PID.TMP or NAME.PID.TID.tmp, replacing's
    and export.py's) that a process which no longer runs left behind (killed mid-write: a
    checkpoint-sized ckpt.pt.PID.TID.tmp), once untouched for quiet_seconds. A writer calls it as
    it starts. -> the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = TEMP_NAME.fullmatch(name)
        full = os.path.join(folder, name)
        try:
            if not m or running(int(m.group(1))) \
                    or time.time() - os.path.getmtime(full) < quiet_seconds:
                continue
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
            removed.append(name)
        except OSError:
            pass
    return removed


def running(pid):
    """Whether a process with this id exists (a zombie counts until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # a process of another user
        return True
    return True


def inside(path, roots):
    """Whether path is one of roots or below one; pass realpaths (every link resolved), so that a
    link cannot lead out."""
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def link_out(folder, roots, limit=10_000):
    """The first entry of folder (of its first `limit`, by name) that resolves outside roots, a link
    that leads out, or None."""
    for name in sorted(os.listdir(folder))[:limit]:
        if not inside(os.path.realpath(os.path.join(folder, name)), roots):
            return os.path.join(folder, name)
    return None


def commit(tmp, path):
    """Put a finished temp file in place: fsync it (the bytes are on disk before the name points at
    them), then rename it over path."""
    with open(tmp, 'rb+') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path, write):
    """Write path atomically: write(f) fills the temp file (binary) that replacing() gives."""
    with replacing(path) as tmp:
        with open(tmp, 'wb') as f:
            write(f)


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode('utf-8')))


def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def finite(obj):
    """obj with every NaN or infinite float (a diverged run's loss) replaced by None: JSON has no
    such numbers, and json.dumps would write bare NaN, which browsers' JSON.parse rejects."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj):
    """json.dumps that writes NaN and infinities as null (finite)."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(finite(obj))
