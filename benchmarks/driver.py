"""The command-line driver the recall benchmarks share: run main.py commands in this process, and train the
synthetic AlexNet run they compress once per work folder (reused when it is already there)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netvlad_toolkit import cli  # noqa: E402

SYNTHETIC_ALEXNET = ['--dataset', 'synthetic', '--arch', 'alexnet', '--fromscratch', '--nGPU', '0']
RUN = os.path.join('alexnet_netvlad_checkpoint', 'alexnet_netvlad_checkpoint')


def run_command(*argv):
    """main.py's command in this process; stops the benchmark when it fails. Prints how long it took."""
    started = time.time()
    if cli.main([str(arg) for arg in argv]) != 0:
        raise SystemExit(f'command failed: {" ".join(map(str, argv))}')
    print(f'{" ".join(str(a) for a in argv if str(a).startswith("--mode"))}: {time.time() - started:.0f} s',
          flush=True)


def trained_run(work_dir, train_flags, common=SYNTHETIC_ALEXNET):
    """Cluster and train (with `train_flags`) in work_dir, each unless its output exists; returns the run folder,
    relative to work_dir (which becomes the current folder)."""
    os.makedirs(work_dir, exist_ok=True)
    os.chdir(work_dir)
    if not os.path.exists(os.path.join('synthetic_data', 'data', 'centroids')):
        run_command('--mode=cluster', *common)
    if not os.path.exists(os.path.join(RUN, 'checkpoints', 'checkpoint.pth.tar')):
        run_command('--mode=train', *train_flags, *common)
    return RUN
