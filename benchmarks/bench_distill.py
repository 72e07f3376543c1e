"""Distillation: AlexNet and VGG16 NetVLAD teachers, each distilled into each student, on the synthetic dataset.

    python benchmarks/bench_distill.py --work_dir /tmp/bench_distill

Per teacher: cluster, then, for the teachers in --trained_teachers, train (--teacher_epochs, Adam at 1e-5 from
scratch as the demo); the others are the cluster-initialised network as it is (by default both: the question here is
how close a student gets to its teacher, and the CPU time goes to distillation). Test. Per student (--fromscratch: no
ImageNet weights can be downloaded here): --mode=distill on the train split's images (with --hint_weight,
--rank_weight and --student_stride), then
--mode=test of the student alone (symmetric) and of its queries against the teacher's database (asymmetric,
--database_run). Latency: one 480x640 image, one thread, process CPU time, the teacher and its students timed in
alternating rounds; GMAC counted at 480x640; size: the serialised state dict. Distillation time: wall and process CPU
time of the --mode=distill command; the descriptor cosine to the teacher and how often a training image's student
descriptor finds the teacher's descriptor of that image first among all training images are the means of its last
epoch.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from driver import run_command  # noqa: E402
from netvlad_toolkit import cli  # noqa: E402
from netvlad_toolkit.model.checkpoint import checkpoint_path, read_checkpoint  # noqa: E402
from netvlad_toolkit.runs.measure import count_macs, interleaved_latency, model_bytes  # noqa: E402
from netvlad_toolkit.runs.results import cpu_model  # noqa: E402
from netvlad_toolkit.runs.runs import open_run  # noqa: E402

LATENCY_SIZE = (480, 640)


def teacher_run(arch, epochs, data_flags):
    """Cluster and train `arch` (each unless done); returns its run folder."""
    run = os.path.join(f'{arch}_netvlad_checkpoint', f'{arch}_netvlad_checkpoint')
    common = [*data_flags, '--arch', arch, '--fromscratch']
    if not os.path.exists(os.path.join('synthetic_data', 'data', 'centroids', f'{arch}_synthetic_64_desc_cen.hdf5')):
        run_command('--mode=cluster', *common)
    if not os.path.exists(os.path.join(run, 'checkpoints', 'checkpoint.pth.tar')):
        if int(epochs):
            run_command('--mode=train', '--optim', 'ADAM', '--lr', '0.00001', '--nEpochs', epochs, '--savePath', run,
                        *common)
        else:
            save_initialised(common, run)
    return run


def save_initialised(common, run):
    """The cluster-initialised network, untrained, as a run folder."""
    from netvlad_toolkit.model.centroids import initialised_model
    from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
    opt = cli.parse_options(['--mode=train', *common])
    save_checkpoint(dict(model_state(initialised_model(opt)), epoch=0, recalls={}, best_score=0.0), run, True)


def recalls(run, data_flags, *flags):
    run_command('--mode=test', '--resume', run, '--split', 'test', *data_flags, *flags)
    name = 'test_test_asymmetric.json' if flags else 'test_test.json'
    with open(os.path.join(run, name)) as f:
        return json.load(f)['recalls']


def distilled(teacher, student, args, data_flags):
    """(student run, its row's distillation fields): distilled unless done."""
    run = f'{teacher}_distilled_{student}'
    timing = dict(seconds=None, cpu_seconds=None)
    done = os.path.exists(checkpoint_path(run)) and read_checkpoint(checkpoint_path(run))['epoch'] >= args.distill_epochs
    if not done:  # a run killed before its last epoch continues (its time is then that of the rest)
        started, started_cpu = time.time(), time.process_time()
        run_command('--mode=distill', '--resume', teacher, '--student', student, '--nEpochs', args.distill_epochs,
                    '--hint_weight', args.hint_weight, '--rank_weight', args.rank_weight, '--student_stride',
                    args.student_stride, '--fromscratch', *data_flags)
        timing = dict(seconds=time.time() - started, cpu_seconds=time.process_time() - started_cpu)
    state = read_checkpoint(checkpoint_path(run))
    return run, dict(timing, descriptor_cosine=state['descriptor_cosine'], own_image_first=state['own_image_first'])


def model_of(run):
    model, checkpoint = open_run(cli.parse_options(['--mode=test', '--resume', run]))
    return model.eval(), checkpoint


def bench(args):
    os.makedirs(args.work_dir, exist_ok=True)
    os.chdir(args.work_dir)
    if args.table:
        return print_table(saved_rows(args.teachers))
    data_flags = ['--dataset', 'synthetic', '--nGPU', '0', '--threads', str(args.threads),
                  f'--synth_db={args.synth_db}', f'--synth_queries={args.synth_queries}',
                  f'--synth_imsize={args.synth_imsize}']
    rows = []
    for arch in args.teachers:
        teacher = teacher_run(arch, args.teacher_epochs if arch in args.trained_teachers else 0, data_flags)
        row = dict(model=f'{arch} teacher', symmetric=recalls(teacher, data_flags), asymmetric=None)
        runs = [(teacher, row)]
        for student in args.students:
            run, distillation = distilled(teacher, student, args, data_flags)
            runs.append((run, dict(model=f'{student} from {arch}', symmetric=recalls(run, data_flags),
                                   asymmetric=recalls(run, data_flags, '--database_run', teacher), **distillation)))
        models = [model_of(run) for run, _ in runs]
        latencies = interleaved_latency([m for m, _ in models], LATENCY_SIZE, args.rounds, args.repeats)
        for (run, row), (model, checkpoint), latency in zip(runs, models, latencies):
            row.update(latency_ms=latency, gmac=count_macs(model, LATENCY_SIZE) / 1e9,
                       mb=model_bytes(model, None, run) / 2 ** 20)
            rows.append(row)
        with open(f'rows_{arch}.json', 'w') as f:  # each teacher's rows as soon as they are measured
            json.dump(rows[-len(runs):], f)
    print_table(rows)


def saved_rows(teachers):
    rows = []
    for arch in teachers:
        with open(f'rows_{arch}.json') as f:
            rows += json.load(f)
    return rows


def print_table(rows):
    print(f'\nCPU: {cpu_model()}; latency at {LATENCY_SIZE[0]}x{LATENCY_SIZE[1]}, 1 thread, process CPU time\n')
    print('| model | R@1 | R@5 | asym. R@1 | asym. R@5 | size (MB) | latency (ms) | GMAC | distillation wall / CPU '
          '(min) | training: descriptor cosine / own image first |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for row in rows:
        sym, asym = row['symmetric'], row['asymmetric']
        asym_cells = f'{asym["1"]:.3f} | {asym["5"]:.3f}' if asym else '- | -'
        minutes = f'{row["seconds"] / 60:.1f} / {row["cpu_seconds"] / 60:.1f}' if row.get('seconds') else '-'
        training = f'{row["descriptor_cosine"]:.3f} / {row["own_image_first"]:.3f}' if asym else '-'
        print(f'| {row["model"]} | {sym["1"]:.3f} | {sym["5"]:.3f} | {asym_cells} | {row["mb"]:.1f} | '
              f'{row["latency_ms"]:.0f} | {row["gmac"]:.2f} | {minutes} | {training} |')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--work_dir', default='/tmp/bench_distill')
    p.add_argument('--teachers', nargs='+', default=['alexnet', 'vgg16'])
    p.add_argument('--students', nargs='+', default=['mobilenet_v3_large', 'mobilenet_v3_small', 'resnet18'])
    p.add_argument('--trained_teachers', nargs='*', default=[],
                   help='Teachers trained (triplets) before distillation; the others are cluster-initialised.')
    p.add_argument('--teacher_epochs', default='3', help='Training epochs of each trained teacher.')
    p.add_argument('--distill_epochs', type=int, default=20)
    p.add_argument('--hint_weight', default='1.0', help="--mode=distill's weight of the local-feature term.")
    p.add_argument('--rank_weight', default='1.0', help="--mode=distill's weight of the ranking term.")
    p.add_argument('--student_stride', default='32', help="--mode=distill's output stride of the students.")
    p.add_argument('--synth_db', type=int, default=150,
                   help='Test database images; the train split (the distillation images) has twice as many, and '
                        'twice as many queries.')
    p.add_argument('--synth_queries', type=int, default=75)
    p.add_argument('--synth_imsize', default='120x160')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--table', action='store_true', help='Only print the table of the rows measured before.')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--repeats', type=int, default=2)
    return p.parse_args()


if __name__ == '__main__':
    bench(parse_args())
