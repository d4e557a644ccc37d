"""
The engine thread: one thread that steps every model's Engine in turn while any has work (server.py's models, all
of them), loads them first, adopts models loaded later, and lets an idle engine's KV cache go.

    engines = start(lambda: [Engine(model_a, tok_a), Engine(model_b, tok_b)])   # loaded and stepped on the thread
    new = adopt(engines[0], lambda: Engine(model_c, tok_c))                     # one more, beside the others

Requests are submitted from any thread (Engine.submit) and their events read from the caller's own (Request); the
model itself is only ever used on this thread (Engine.call runs a function there, between two steps).
"""
import ctypes
import os
import threading
import traceback

import torch

# cores the server's jobs hold (jobs.py sets it): the engine thread runs its ops on the others. A
# job's OpenMP team on one core and ours on both meet at every op and wait on the shared core:
# beside a training job on 2 cores a stream decoded 32 tok/s with two threads, 614 with one
# (650 / 661 alone; /tmp-script timings from bench.py --which=fairness's pieces)
reserved = 0


def reserve(cores):
    """Leave `cores` cores to the jobs from the engine thread's next step on (0: all back)."""
    global reserved
    reserved = cores


def keep_freed_memory():
    """Let glibc keep freed memory for reuse, in this process: by default it hands every large
    block (the (B, vocab) logits and their softmax, a few MB each) back to the OS when freed, and
    the next step pays ~1 ms per block in page faults to get it back (measured: choose() at 16 rows
    4.4 -> 1.6 ms). The price: up to 256 MB of freed heap stays mapped. A no-op where the C library
    is not glibc."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        # M_TRIM_THRESHOLD: keep up to 256 MB free at the top of the heap
        libc.mallopt(-1, 256 << 20)
        # M_MMAP_THRESHOLD: blocks under 64 MB come from the heap, not fresh mappings
        libc.mallopt(-3, 64 << 20)
    except (OSError, AttributeError):
        pass

def start(build, idle_release=60.0):
    """Run build() -> a list of Engines on a new daemon thread, then step them there, in turn,
    while any has work, until each is stopped; a KV cache is let go after idle_release idle
    seconds. -> the engines (build's exceptions are raised here). subtle: OpenMP gives each thread
    that runs parallel ops its own team of workers; with two teams on two cores (a model loaded on
    one thread and decoded on another, or two models on two threads) libgomp counts itself
    oversubscribed and its workers sleep between ops (measured on GPT-2 124M int8, batch 1: 44-50
    tok/s against 63-72). So build() loads the models on this thread, and several models share
    it."""
    keep_freed_memory()
    out, ready = [], threading.Event()

    def run():
        try:
            engines = list(build())
        except BaseException as e:
            out.append(e)
            return ready.set()
        wake = threading.Event()
        for e in engines:
            e.wake, e.thread, e.pool = wake, threading.current_thread(), engines
        out.append(list(engines))
        ready.set()
        base = torch.get_num_threads()  # (OpenMP's count is this thread's own)
        while engines:  # adopt() adds to it; a stopped engine leaves it once its requests are done
            want = min(base, max(1, (os.cpu_count() or 1) - reserved)) if reserved else base
            if want != torch.get_num_threads():
                torch.set_num_threads(want)
            wake.clear()
            for e in list(engines):
                e._run_calls()
                if e.stopped and not e.busy():
                    engines.remove(e)
                    e._release()
            busy = [e for e in engines if e.busy()]
            if not busy:
                if not wake.wait(idle_release) and not any(e.busy() for e in engines):
                    for e in engines:
                        e.cache = None  # idle: give the memory back
                continue
            for e in busy:
                try:
                    e.step()
                except Exception as err:
                    # a bug must not hang the clients: fail what is running, keep serving
                    traceback.print_exc()
                    e._fail(err)
    threading.Thread(target=run, daemon=True, name='engine').start()
    ready.wait()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]

def adopt(engine, build):
    """build() -> a new Engine, stepped beside `engine` on the thread that steps it (start's) ->
    the new Engine (server.py's POST /v1/models/load). build runs on a thread of its own, so the
    others decode meanwhile; that thread ends with it, and its OpenMP team with it (see start: two
    teams that outlive the load would slow every step after). A build that fails raises here, with
    its frames cleared: a traceback's frames hold what the load had read, in a cycle that only a
    full garbage collection would free."""
    out = []

    def load():
        try:
            out.append(build())
        except BaseException as e:
            chained = e
            while chained is not None:
                traceback.clear_frames(chained.__traceback__)
                chained = chained.__cause__ or chained.__context__
            out.append(e)
    loader = threading.Thread(target=load, daemon=True, name='loader')
    loader.start()
    loader.join()
    if isinstance(out[0], BaseException):
        raise out[0]

    def run():
        new = out[0]
        new.wake, new.thread, new.pool = engine.wake, threading.current_thread(), engine.pool
        engine.pool.append(new)
        return new
    return engine.call(run)
