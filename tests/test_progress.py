"""progress.py against a fake clock: the format (i/N, percent, rate, ETA), the cadence into a file (one line per
every_s, the last always) and on a terminal (one line rewritten in place), and the trainers' log lines."""
import io

from nanolab.progress import Progress, at, clock_text


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_format_and_the_eta():
    assert [clock_text(s) for s in (0, 59.4, 65, 600, 3723, None, float('inf'))] == \
        ['0:00', '0:59', '1:05', '10:00', '1:02:03', '?', '?']
    assert at(300, 1000, 0.1) == '300/1000 (30%), ETA 1:10'  # 700 steps at 0.1 s
    clock, out = Clock(), io.StringIO()
    p = Progress(1000, 'tokenizing', 'docs', stream=out, clock=clock)
    clock.t = 20.0
    p.update(250, 'a note')  # 250 in 20 s: 12.5/s; 750 left: 60 s
    assert out.getvalue() == 'tokenizing: 250/1,000 (25%), 12.5 docs/s, ETA 1:00, a note\n'


def test_the_cadence_into_a_file_and_on_a_terminal():
    clock, out = Clock(), io.StringIO()
    p = Progress(100, stream=out, every_s=10.0, clock=clock)
    for i in range(1, 101):  # one item a second
        clock.t = float(i)
        p.update(i)
    lines = out.getvalue().splitlines()
    assert [line.split('/')[0] for line in lines] == ['1', '11', '21', '31', '41', '51', '61', '71', '81', '91', '100']
    assert lines[-1] == '100/100 (100%), 1.0 it/s, ETA 0:00'
    clock, tty = Clock(), Tty()
    p = Progress(10, stream=tty, tty_every=2.0, clock=clock)
    for i in range(1, 11):
        clock.t = float(i)  # twice the terminal's cadence: every other update shows (1, 3, 5, 7, 9), and the last
        p.update(i)
    text = tty.getvalue()
    assert '\n' not in text[:-1] and text.endswith('\n') and text.count('\r') == 6  # in place, then ended
    assert text.split('\r')[-1].startswith('10/10 (100%)')
