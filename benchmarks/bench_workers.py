"""DataLoader workers under each multiprocessing start method: the tiny demo (`python main.py --mode=demo
--demo_size tiny`, every mode it runs) in a subprocess whose start method is set before the toolkit starts, as on
Python 3.14 (forkserver on Linux) or on macOS (spawn), and the toolkit's loaders told to start their workers that
way too ($NETVLAD_WORKER_START_METHOD; a checkout that does not read it follows the interpreter's start method).
Wall time and CPU time of each run (the subprocess and every process it started: its DataLoader workers, a
forkserver and the workers forked from it), the arms interleaved over --rounds, each in a fresh folder.

First, the start cost of one worker under each method (what images.WORKER_START_SECONDS holds): in a fresh process
per method that has the toolkit imported, DataLoaders of one worker over one small image, after a first one (which
starts the forkserver): the CPU time the worker spent before its first item (its worker_init_fn; a forked child's
CPU clock starts at zero), plus what this process spent starting it.

Usage: python benchmarks/bench_workers.py [--methods fork forkserver spawn] [--rounds 2] [--repo DIR]
       (--repo: the checkout whose main.py runs; by default the one this script is in)
"""
import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_FLAGS = ['--mode=demo', '--demo_size', 'tiny', '--nGPU', '0']
# Runs main.py as `python main.py` would, after setting the start method (argv: method, main.py, its flags). The
# forkserver is stopped at the end so that the CPU time of the workers forked from it is counted (a server left to
# exit on its own is reaped by nobody the benchmark waits for).
WRAPPER = '''
import multiprocessing, multiprocessing.forkserver, os, runpy, sys
multiprocessing.set_start_method(sys.argv[1])
main_path = sys.argv[2]
sys.path.insert(0, os.path.dirname(main_path))
sys.argv = [main_path] + sys.argv[3:]
try:
    runpy.run_path(main_path, run_name='__main__')
finally:
    multiprocessing.forkserver._forkserver._stop()
'''


def cpu_name():
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            return next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_demo(repo, method, log_path):
    """(wall s, CPU s) of one tiny demo in a fresh folder, with `method` as the interpreter's start method and the
    toolkit's."""
    environment = dict(os.environ, NETVLAD_WORKER_START_METHOD=method)
    with tempfile.TemporaryDirectory(prefix=f'bench_workers_{method}_') as folder, open(log_path, 'w') as log:
        cpu_before, started = children_cpu(), time.time()
        finished = subprocess.run([sys.executable, '-c', WRAPPER, method, os.path.join(repo, 'main.py'), *DEMO_FLAGS],
                                  cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT)
        wall, cpu = time.time() - started, children_cpu() - cpu_before
    if finished.returncode != 0:
        raise SystemExit(f'the demo under {method} failed (exit {finished.returncode}); its output: {log_path}')
    return wall, cpu


def worker_started(_):
    """worker_init_fn: the CPU time this worker process has spent so far, in the folder $BENCH_WORKERS_STARTS."""
    with open(os.path.join(os.environ['BENCH_WORKERS_STARTS'], f'{os.getpid()}.txt'), 'w') as record:
        record.write(str(time.process_time()))


def start_cost_probe(method, loaders=4):
    """Print the median CPU seconds of one worker's start under `method` (in the worker before its first item, and in
    this process), over `loaders` DataLoaders of one worker after a first."""
    import multiprocessing

    import numpy as np
    import torch.utils.data as data
    from PIL import Image

    from netvlad_toolkit.datasets import datasets, images  # noqa: F401  (what a run has imported by its first loader)
    multiprocessing.set_start_method(method)
    with tempfile.TemporaryDirectory() as folder:
        os.environ['BENCH_WORKERS_STARTS'] = folder
        path = os.path.join(folder, 'image.png')
        Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(path)
        parent_seconds = []
        for _ in range(loaders + 1):
            loader = data.DataLoader(images.ImageList([path]), num_workers=1, worker_init_fn=worker_started,
                                     multiprocessing_context=images.worker_context(method))
            started = time.process_time()
            list(loader)
            parent_seconds.append(time.process_time() - started)
        worker_seconds = [float(open(os.path.join(folder, name)).read()) for name in os.listdir(folder)
                          if name.endswith('.txt')]
    print(statistics.median(worker_seconds), statistics.median(parent_seconds[1:]))


def start_costs(repo, methods):
    """{method: (worker CPU s, this process's CPU s)} of one worker's start, each method in a fresh process."""
    costs = {}
    for method in methods:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get('PYTHONPATH')])))
        done = subprocess.run([sys.executable, os.path.abspath(__file__), '--probe_start', method], env=environment,
                              capture_output=True, text=True, check=True)
        costs[method] = tuple(float(x) for x in done.stdout.split()[-2:])
    return costs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=['fork', 'forkserver', 'spawn'],
                   choices=['fork', 'forkserver', 'spawn'], help='Start methods to compare; the first is the base.')
    p.add_argument('--rounds', type=int, default=2, help='Runs of each method, interleaved.')
    p.add_argument('--repo', default=ROOT, help='The checkout whose main.py runs.')
    p.add_argument('--logs', default=tempfile.gettempdir(), help='Folder of each run\'s output.')
    p.add_argument('--probe_start', choices=['fork', 'forkserver', 'spawn'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe_start:
        return start_cost_probe(args.probe_start)
    repo = os.path.abspath(args.repo)
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}; {repo}', flush=True)
    print('\n| start method | one worker\'s start: CPU s in the worker | CPU s in the main process |\n|---|---|---|')
    for method, (worker, parent) in start_costs(repo, args.methods).items():
        print(f'| {method} | {worker:.3f} | {parent:.3f} |', flush=True)
    print()
    times = {method: [] for method in args.methods}
    for round_number in range(1, args.rounds + 1):
        for method in args.methods:
            log_path = os.path.join(args.logs, f'bench_workers_{method}_{round_number}.log')
            times[method].append(timed_demo(repo, method, log_path))
            print(f'round {round_number} {method}: wall {times[method][-1][0]:.1f} s, '
                  f'CPU {times[method][-1][1]:.1f} s', flush=True)
    base_wall, base_cpu = (statistics.median(t[i] for t in times[args.methods[0]]) for i in (0, 1))
    print(f'\n| start method | wall s (median of {args.rounds}) | CPU s, children included | wall / '
          f'{args.methods[0]} | CPU / {args.methods[0]} |\n|---|---|---|---|---|')
    for method, runs in times.items():
        wall, cpu = (statistics.median(t[i] for t in runs) for i in (0, 1))
        print(f'| {method} | {wall:.1f} | {cpu:.1f} | {wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |')


if __name__ == '__main__':
    main()
