"""
How far a long job is, one copy for every script: `i/N (p%)`, its rate and the time left.

  at(i, total, seconds_per_step)   '300/1000 (30%), ETA 1:10': what a trainer's log line starts
                                   with
  Progress(total, what, unit)      data.py's tokenization, evaluate.py's answers: update(i) prints
                                   at a steady cadence, on a terminal one line rewritten in place,
                                   into a file plain lines

No dependencies, so data.py does not pay for torch to use it.
"""
import sys
import time


def clock_text(seconds):
    """1:05, 12:00, 1:02:03 (h:mm:ss past an hour); '?' before there is a rate."""
    if seconds is None or seconds != seconds or seconds == float('inf'):
        return '?'
    s = max(0, int(round(seconds)))
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}' if s >= 3600 else \
        f'{s // 60}:{s % 60:02d}'


def at(i, total, seconds_per_step):
    """'i/total (p%), ETA m:ss' with the time left at seconds_per_step (a trainer's recent
    ms/iter)."""
    return f'{i}/{total} ({100 * i / max(total, 1):.0f}%), ' \
        f'ETA {clock_text((total - i) * seconds_per_step)}'


class Progress:
    """Report i of total done. On a terminal: one line rewritten in place ('\\r'), at most every
    tty_every seconds. Into a file or a pipe: a plain line at most every every_s seconds, so a log
    of a long job stays short. The rate and the ETA are over the whole job so far (items per second
    since the first update), so a slow start does not make the ETA jump. The last update (i ==
    total) always prints, and ends an in-place line; done() ends one early (an error, a break).
    clock: time.monotonic, or a fake."""

    def __init__(self, total, what='', unit='it', stream=None, every_s=10.0, tty_every=0.2,
                 clock=time.monotonic):
        self.total, self.what, self.unit, self.clock = total, what, unit, clock
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self.every = tty_every if self.tty else every_s
        self.t0, self.last, self.i, self.open = clock(), None, 0, False

    def text(self, i, note=''):
        elapsed = self.clock() - self.t0
        rate = i / elapsed if elapsed > 0 else 0.0
        eta = (self.total - i) / rate if rate > 0 else None
        head = f'{self.what}: ' if self.what else ''
        return (f'{head}{i:,}/{self.total:,} ({100 * i / max(self.total, 1):.0f}%), {rate:,.1f} '
                f'{self.unit}/s, ETA {clock_text(eta)}' + (f', {note}' if note else ''))

    def update(self, i, note=''):
        self.i = i
        now = self.clock()
        if i < self.total and self.last is not None and now - self.last < self.every:
            return
        self.last = now
        line = self.text(i, note)
        if self.tty:
            self.stream.write('\r' + line + '\x1b[K')  # erase what a longer line left
            self.open = True
        else:
            self.stream.write(line + '\n')
        self.stream.flush()
        if i >= self.total:
            self.done()

    def done(self):
        """End the in-place line (a terminal), so what prints next starts on its own line."""
        if self.open:
            self.stream.write('\n')
            self.stream.flush()
            self.open = False
