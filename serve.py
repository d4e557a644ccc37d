"""
Serve models over HTTP: an OpenAI-compatible API with streaming, the tokenizer, and the web page in
web/ (chat, look inside the model, compare, judge, runs), and nanolab's scripts run as jobs
(POST /v1/jobs: nanolab/jobs.py). Standard library only (http.server); several models at once.

    python serve.py --init_from=out-shakespeare-char  # CPU: open http://127.0.0.1:8000
    python serve.py --init_from=out-a,out-b --device=cuda  # one GPU, two models
    python serve.py --init_from=runs                  # every run under runs/ holding ckpt.pt
    python serve.py --init_from=out-shakespeare-char --quantize=int8  # CPU int8: 1/4-1/3 the bytes
    python serve.py --init_from=out-sft --host=0.0.0.0 --api_key=SECRET  # other machines: a key
    python serve.py --help                            # every setting

    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "out-shakespeare-char", "prompt": "ROMEO:", "max_tokens": 50,
              "stream": true}'

The endpoints are listed in nanolab/server.py; OpenAI's formats are nanolab/openai_api.py's, the
decoding, batching and fairness between clients nanolab/engine.py's, the guards against hostile
pages and clients nanolab/httpd.py's.
Bounded work: a request over max_rows or max_prompt_tokens is a 400 naming the setting; a client
that hangs up frees its rows within a step. Importing serve.py does nothing: its code sits in
main() (tests start servers with nanolab.server.load_engines and make_server).
"""
import gc
import os

from nanolab.configurator import cli_errors, configure
from nanolab.device import DTYPES, resolve_device
from nanolab.quantize import QUANTIZE
from nanolab.server import load_engines, make_server

# -----------------------------------------------------------------------------
init_from = 'out-shakespeare-char'  # model sources, comma-separated (out_dir, HF dir, hub name), or a dir of runs
host = '127.0.0.1'          # bind address; any other than localhost needs api_key
port = 8000                 # TCP port; 0 = any free port
api_key = ''                # if set, the API needs 'Authorization: Bearer <api_key>'; '' = $NANOLAB_API_KEY if set
max_batch = 16              # rows decoded together per model (KV-cache slots); further prompts wait their turn
max_rows = 256              # rows (prompts x n x num_beams) a request may ask for; over it: 400
max_prompt_tokens = 32768   # prompt tokens a request may send; over it: 400
prefill_chunk = 256         # prompt tokens prefilled per step, so a long prompt cannot stall the other streams
max_tokens_limit = 4096     # the largest max_tokens a request may ask for
max_connections = 256       # open connections at once (a thread each); beyond: 503 with Retry-After
read_timeout = 10.0         # seconds to send a whole request (line, headers, body); also the keep-alive idle time
max_client_requests = 16    # requests of one client (address + key) run at once, its others waiting their turn; 16 = max_batch
n_limit = 16                # the largest n (samples per prompt) and num_beams
threads = 0                 # torch threads for the models; 0 = torch's default (one per core)
device = 'auto'             # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'              # auto (bf16 on GPU; CPU: a bf16 model's bf16 if the CPU has bf16, else fp32) | float32 | bfloat16 | float16
quantize = ''               # '' (off) | int8: int8 weights in every linear and the token embedding; CPU | int4: 4-bit block linears, int8 head (quantize.py)
compile = False             # torch.compile each model's decode steps before serving (10-40 s a model): int8 batch-1 steps 1.15-2x faster (bench.py --which=decode_profile)
runs_dir = '.'              # GET /runs lists its subdirectories that hold metrics.jsonl (the run dashboard)
allowed_hosts = ''          # Host names to answer besides loopback names, IP addresses and `host`; comma list, * = any
cors_origins = ''           # web origins (https://app.example) whose pages may call the API; comma list, * = any
max_models = 8              # models loaded at once, counting POST /v1/models/load's; beyond: 409
models_dir = ''             # directories POST /v1/models/load and jobs may read besides runs_dir and the HF cache; comma list
max_jobs = 1                # jobs (POST /v1/jobs) run at once, the rest queued; 2 CPU trainings on 2 cores help no one
data_dir = 'data'           # where jobs read and prepare datasets (their data_dir)
# -----------------------------------------------------------------------------
CHOICES = {'dtype': DTYPES, 'quantize': QUANTIZE}


def main():
    configure(globals(), choices=CHOICES)
    # the environment keeps it out of the process list
    key = api_key or os.environ.get('NANOLAB_API_KEY', '')
    dev = resolve_device(device)
    engines = load_engines(init_from, dev, dtype, quantize, threads, compile,
                           max_batch=max_batch,
                           max_rows=max_rows, max_prompt_tokens=max_prompt_tokens,
                           prefill_chunk=prefill_chunk,
                           # beam searches leave half the slots to the others
                           max_beam_slots=max_batch // 2)
    server = make_server(engines, host, port, key, runs_dir, allowed_hosts.split(','),
                         cors_origins.split(','), max_connections, read_timeout, max_models,
                         max_tokens_limit, n_limit, models_dir.split(','), max_client_requests,
                         max_jobs, data_dir)
    # subtle: what exists now (modules, the models) lives as long as the server. gc.freeze() keeps the
    # cyclic collector from walking it again: a full collection over it paused every stream for ~70 ms
    # (measured), a cost that landed on whichever request was in flight
    gc.collect()
    gc.freeze()
    print(f"serving {', '.join(engines)} on "
          f"http://{host}:{server.server_address[1]}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:  # the jobs end with the server, each as on Ctrl-C: a trainer writes its checkpoint
        server.jobs.close()


if __name__ == '__main__':
    with cli_errors():  # bad input: one line naming the problem and the fix, exit 1, no traceback
        main()
