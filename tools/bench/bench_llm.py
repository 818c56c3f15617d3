"""The LLM adapters' overhead against the libraries they replace or wrap.

    python3 tools/bench/bench_llm.py [--rounds 21] [--tokens 256] [--requests 1000]

Figures (one JSON line each, via common.report):

* ``llamacpp_tokens_per_s``: LlamaCppAdapter.generate against direct
  ``llama_cpp.Llama.create_completion`` calls, same generated model (dim 256, 4 layers,
  no chat template, so both send the same raw prompt), same parameters, one thread each;
  interleaved in one run, medians of wall-clock rates, plus ``paired_ratio`` (median of
  each round's ratio). ``llamacpp_tokens_per_cpu_s``: the same runs per CPU second of
  the process, which a busy neighbour skews less. Target ratio >= 0.97.
  ``llamacpp_one_token_call``: the adapter's fixed cost per call, from one-token calls,
  and its share of one ``--tokens`` call: the part of the ratio that is not noise.
* ``ollama_requests_per_s_vs_client`` / ``..._vs_async_client``: sequential
  non-streamed OllamaAdapter.generate requests against the official client's
  ``ollama.Client`` / ``ollama.AsyncClient`` on the same stand-in server, run in its own
  process so the server does not share the clients' GIL; interleaved blocks, medians.
  ``ollama_requests_per_client_cpu_s_vs_*``: the same blocks per CPU second of the
  client process. Target ratio >= 1.0.
* ``import_fmedge_adapters_ollama``: ``import fmedge.adapters.ollama`` against
  ``import ollama``, each in a fresh interpreter, interleaved medians.
"""

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, interleaved_medians, report

BENCH_SHAPE = {"dim": 256, "layers": 4, "ctx": 2048}   # timing not dominated by overhead
N_CTX = 512
N_THREADS = 1          # one thread: two spin on barriers whenever a neighbour holds a core
PROMPT = "hello world the edge model"
SEED = 11
TEMPERATURE = 0.7
STANDIN_MODEL = "llama3.2"
OLLAMA_NUM_PREDICT = 16
STANDIN_START_DEADLINE_S = 30


# -- llama.cpp: adapter against direct calls ----------------------------------------------

def make_bench_model(directory):
    """The generator is a script, not a package: load it by path."""
    path = os.path.join(ROOT, "tools", "make_tiny_gguf.py")
    spec = importlib.util.spec_from_file_location("make_tiny_gguf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_gguf(os.path.join(directory, "bench.gguf"),
                                 chat_template=False, **BENCH_SHAPE)


class Timer:
    """Wall-clock and process CPU seconds (all threads: the adapter's worker included).

    CPU time is the steadier measure on a shared machine: it leaves out the time a
    neighbour's process held the core (not the cache misses it caused).
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def direct_rates(llm, tokens):
    """(tokens per wall second, tokens per CPU second) of one direct call."""
    with Timer() as timer:
        answer = llm.create_completion(PROMPT, max_tokens=tokens, temperature=TEMPERATURE,
                                       stop=[], seed=SEED)
    generated = answer["usage"]["completion_tokens"]
    return generated / timer.wall, generated / timer.cpu


async def adapter_rates(adapter, tokens):
    with Timer() as timer:
        result = await adapter.generate(PROMPT, temperature=TEMPERATURE, max_tokens=tokens,
                                        seed=SEED)
    return result.completion_tokens / timer.wall, result.completion_tokens / timer.cpu


async def compare_llama_cpp(model_path, rounds, tokens):
    """{"direct"|"adapter": [(wall rate, cpu rate) per round]}."""
    from fmedge.adapters.llamacpp import LlamaCppAdapter

    adapter = LlamaCppAdapter(model_path, n_ctx=N_CTX, n_threads=N_THREADS)
    rates = {"direct": [], "adapter": []}
    try:
        await adapter_rates(adapter, 16)  # loads the model; warms up first-call allocations
        # The direct calls use the very Llama the adapter loaded (same load options:
        # n_ctx, n_threads, n_threads_batch, verbose=False). Two separately loaded copies
        # differed by up to 6 % in speed on this machine, which would swamp a 3 % target.
        llm = adapter._entry.llm
        direct_rates(llm, 16)
        for round_number in range(rounds):
            # Alternate who goes first, so drift in machine load hits both alike.
            direct_first = round_number % 2 == 0
            if direct_first:
                rates["direct"].append(direct_rates(llm, tokens))
            rates["adapter"].append(await adapter_rates(adapter, tokens))
            if not direct_first:
                rates["direct"].append(direct_rates(llm, tokens))
    finally:
        await adapter.close()
    return rates


def median_of(pairs, index):
    return statistics.median(pair[index] for pair in pairs)


def paired_ratio(rates, baseline, index):
    """Median of each round's adapter/baseline ratio: the two measurements of a round ran
    back to back, under about the same load, so this is steadier than a ratio of medians
    on a shared machine."""
    return statistics.median(a[index] / b[index]
                             for a, b in zip(rates["adapter"], rates[baseline]))


# -- Ollama: adapter against the official client ------------------------------------------

def start_standin():
    """The stand-in in its own process on a free port; (process, url)."""
    argv = [sys.executable, os.path.join(ROOT, "tools", "ollama_standin.py"),
            "--port", "0", "--models", STANDIN_MODEL]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()     # "ollama stand-in listening on URL (models: ...)"
    if "listening on" not in line:
        process.kill()
        raise RuntimeError("the Ollama stand-in did not start: %r" % line)
    return process, line.split("listening on ", 1)[1].split()[0]


def stop_standin(process):
    process.terminate()
    process.wait(STANDIN_START_DEADLINE_S)


GENERATE_OPTIONS = {"temperature": TEMPERATURE, "num_predict": OLLAMA_NUM_PREDICT}


async def adapter_block(adapter, count):
    """(requests per wall second, requests per client CPU second) of ``count`` calls."""
    with Timer() as timer:
        for _ in range(count):
            await adapter.generate(PROMPT, temperature=TEMPERATURE,
                                   max_tokens=OLLAMA_NUM_PREDICT)
    return count / timer.wall, count / timer.cpu


async def client_block(client, count):
    # The synchronous client, called as it is meant to be; a coroutine only so that the
    # three kinds of block can be run alike (nothing else runs on this loop).
    with Timer() as timer:
        for _ in range(count):
            client.generate(model=STANDIN_MODEL, prompt=PROMPT, stream=False,
                            options=GENERATE_OPTIONS)
    return count / timer.wall, count / timer.cpu


async def async_client_block(client, count):
    with Timer() as timer:
        for _ in range(count):
            await client.generate(model=STANDIN_MODEL, prompt=PROMPT, stream=False,
                                  options=GENERATE_OPTIONS)
    return count / timer.wall, count / timer.cpu


async def compare_ollama(url, rounds, requests):
    """({"adapter"|"client"|"async_client": [(wall rate, cpu rate) per block]}, block)."""
    import ollama
    from fmedge.adapters.ollama import OllamaAdapter

    adapter = OllamaAdapter(base_url=url, model=STANDIN_MODEL)
    client = ollama.Client(host=url)
    async_client = ollama.AsyncClient(host=url)
    block = max(1, requests // rounds)
    blocks = [("adapter", adapter_block, adapter), ("client", client_block, client),
              ("async_client", async_client_block, async_client)]
    rates = {name: [] for name, _, _ in blocks}
    try:
        for _, run_block, target in blocks:
            await run_block(target, 5)    # warm-up: connections, first-call imports
        for round_number in range(rounds):
            # Rotate who goes first, so drift in machine load hits all three alike.
            shift = round_number % len(blocks)
            for name, run_block, target in blocks[shift:] + blocks[:shift]:
                rates[name].append(await run_block(target, block))
    finally:
        await adapter.close()
    return rates, block


# -- import time --------------------------------------------------------------------------

def compare_imports(runs):
    python = [sys.executable, "-c"]
    commands = {"pass": python + ["pass"],
                "fmedge": python + ["import fmedge.adapters.ollama"],
                "ollama": python + ["import ollama"]}
    env = dict(os.environ, PYTHONPATH=ROOT)
    interleaved_medians(commands, 1, cwd=ROOT, env=env)   # warm the page cache
    return interleaved_medians(commands, runs, cwd=ROOT, env=env)


# -- main ---------------------------------------------------------------------------------

def bench_llama_cpp(args):
    with tempfile.TemporaryDirectory() as work:
        model = make_bench_model(work)
        rates = asyncio.run(compare_llama_cpp(model, args.rounds, args.tokens))
        single = asyncio.run(compare_llama_cpp(model, args.overhead_calls, 1))
    common = dict(target=">= 0.97", rounds=args.rounds, tokens=args.tokens,
                  n_threads=N_THREADS, **BENCH_SHAPE)
    for name, index in (("llamacpp_tokens_per_s", 0), ("llamacpp_tokens_per_cpu_s", 1)):
        report(name, median_of(rates["adapter"], index), "tokens/s",
               baseline=median_of(rates["direct"], index),
               baseline_name="llama_cpp.Llama.create_completion",
               paired_ratio=round(paired_ratio(rates, "direct", index), 3), **common)
    # The adapter's fixed cost per call (worker thread, event-loop hand-off, tokenizing
    # for the clamp), from one-token calls where it is not lost in the decoding time.
    adapter_ms, direct_ms = (1000.0 / median_of(single[name], 0)
                             for name in ("adapter", "direct"))
    call_ms = 1000.0 * args.tokens / median_of(rates["direct"], 0)
    report("llamacpp_one_token_call", adapter_ms, "ms", baseline=direct_ms,
           baseline_name="llama_cpp.Llama.create_completion", calls=args.overhead_calls,
           overhead_ms=round(adapter_ms - direct_ms, 3),
           overhead_share_of_a_long_call=round((adapter_ms - direct_ms) / call_ms, 4),
           long_call_tokens=args.tokens)


def bench_ollama(args):
    process, url = start_standin()
    try:
        rates, block = asyncio.run(compare_ollama(url, args.rounds, args.requests))
    finally:
        stop_standin(process)
    common = dict(target=">= 1.0", rounds=args.rounds, requests_per_block=block,
                  num_predict=OLLAMA_NUM_PREDICT)
    for baseline, label in (("client", "Client"), ("async_client", "AsyncClient")):
        for index, per in ((0, "s"), (1, "client_cpu_s")):
            report("ollama_requests_per_%s_vs_%s" % (per, baseline),
                   median_of(rates["adapter"], index), "requests/s",
                   baseline=median_of(rates[baseline], index),
                   baseline_name="ollama.%s.generate" % label,
                   paired_ratio=round(paired_ratio(rates, baseline, index), 3), **common)


def bench_imports(args):
    medians = compare_imports(args.import_runs)
    interpreter = medians["pass"]
    report("import_fmedge_adapters_ollama", medians["fmedge"] * 1000, "ms",
           baseline=medians["ollama"] * 1000, baseline_name="import ollama",
           runs=args.import_runs, interpreter_ms=round(interpreter * 1000, 2),
           net_ms=round((medians["fmedge"] - interpreter) * 1000, 2),
           baseline_net_ms=round((medians["ollama"] - interpreter) * 1000, 2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--overhead-calls", type=int, default=101)
    parser.add_argument("--import-runs", type=int, default=21)
    args = parser.parse_args()
    bench_llama_cpp(args)
    bench_ollama(args)
    bench_imports(args)


if __name__ == "__main__":
    main()
