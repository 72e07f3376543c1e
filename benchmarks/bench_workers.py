"""DataLoader workers under each multiprocessing start method: the tiny demo (`python main.py --mode=demo
--demo_size tiny`, every mode it runs) in a subprocess whose start method is set before the toolkit starts, as on
Python 3.14 (forkserver on Linux) or on macOS (spawn), and the toolkit's loaders told to start their workers that
way too ($NETVLAD_WORKER_START_METHOD; a checkout that does not read it follows the interpreter's start method).
Wall time and CPU time of each run (the subprocess and every process it started: its DataLoader workers, a
forkserver and the workers forked from it), the arms interleaved over --rounds, each in a fresh folder.

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', nargs='+', default=['fork', 'forkserver', 'spawn'],
                   choices=['fork', 'forkserver', 'spawn'], help='Start methods to compare; the first is the base.')
    p.add_argument('--rounds', type=int, default=2, help='Runs of each method, interleaved.')
    p.add_argument('--repo', default=ROOT, help='The checkout whose main.py runs.')
    p.add_argument('--logs', default=tempfile.gettempdir(), help='Folder of each run\'s output.')
    args = p.parse_args()
    repo = os.path.abspath(args.repo)
    print(f'CPU: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}; {repo}', flush=True)
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
