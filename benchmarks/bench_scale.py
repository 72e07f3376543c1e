"""Pitts250k-sized evaluation with generated descriptors (no images): peak RSS and time of the search that test mode
runs (retrieval.search_and_recall) for 32k-D exact, 4096-D PCA-whitened exact, and approximate indexes.

    python benchmarks/bench_scale.py --workdir /tmp/bench_scale            # everything, full size
    python benchmarks/bench_scale.py --workdir /tmp/bench_scale --queries 2000   # fewer queries (extrapolated)

Sizes are pitts250k test's: 83,952 database images (3,498 places x 24 views: 2 pitches x 12 yaws) and 8,280
queries, posDistThr 25 m. The geometry is generated (a grid of streets, places every 12.5 m; queries anywhere on
the streets) since the pitts250k dbStruct is not here. A descriptor is a smooth function of the facade point the
camera looks at (random Fourier features mapped into 32,768-D), plus a strong low-rank nuisance shared by all
images (lighting, season: what PCA whitening is meant to suppress) and isotropic noise, L2-normalised. The PCA
whitening is fitted, as --mode=pca does, on 10,000 "training-database" descriptors of a separate area.

Every measured step runs in its own process, which reports its own peak RSS (getrusage ru_maxrss), so no step
inherits another's memory. Descriptors live on disk as DescriptorFiles (float32 by default, as --desc_dtype), in
the layout test mode writes: the database rows, then the query rows. They take about 12 GB (32k-D) + 1.5 GB
(4096-D) of --workdir, which is kept for reruns unless --cleanup.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netvlad_toolkit.search.descriptors import DescriptorFile, load_descriptor_file  # noqa: E402

NUM_PLACES, VIEWS, NUM_QUERIES, NUM_TRAIN = 3498, 24, 8280, 10000
FULL_DIM, PCA_DIM = 32768, 4096
PLACE_SPACING_M, STREET_SPACING_M, LOOK_DISTANCE_M = 12.5, 150.0, 10.0
LATENT, NUISANCE, LENGTH_SCALE_M = 256, 64, 8.0
ALIAS, ALIAS_PERIOD_M = 0.7, 150.0             # share of the appearance that repeats on every street
APPEARANCE_NOISE = 1.2                         # per-image change of appearance (viewpoint, light), relative
SIGNAL, NUISANCE_GAIN, NOISE = 1.0, 1.0, 0.5   # norms of the three parts before L2 normalisation
VARIANTS = ['exact32k', 'exact4096', 'ivfpq4096', 'hnsw4096']


# ---------------------------------------------------------------------------------------------- data

def geometry(rng):
    """UTM of the database images (24 views per place, each with its yaw) and of the queries, on a street grid."""
    per_street = 100
    streets = -(-NUM_PLACES // per_street)
    along = np.tile(np.arange(per_street) * PLACE_SPACING_M, streets)[:NUM_PLACES]
    street = np.repeat(np.arange(streets), per_street)[:NUM_PLACES]
    places = np.stack([along, street * STREET_SPACING_M], axis=1) + 585000.0
    db_utm = np.repeat(places, VIEWS, axis=0)
    db_yaw = np.tile(np.repeat(np.arange(12) * np.pi / 6, 2), NUM_PLACES)
    db_pitch = np.tile([0, 1], NUM_PLACES * 12)
    q_street = rng.integers(0, streets, NUM_QUERIES)
    q_along = rng.uniform(0, (per_street - 1) * PLACE_SPACING_M, NUM_QUERIES)
    q_utm = np.stack([q_along, q_street * STREET_SPACING_M], axis=1) + 585000.0 + rng.normal(0, 2, (NUM_QUERIES, 2))
    q_yaw = rng.uniform(0, 2 * np.pi, NUM_QUERIES)
    return db_utm, db_yaw, db_pitch, q_utm, q_yaw


class DescriptorModel:
    """x = normalise(SIGNAL * B (z(looked-at point, pitch) + e) + NUISANCE_GAIN * A w + NOISE * n), float32 torch.

    B [LATENT, D] and A [NUISANCE, D]: random orthonormal rows; z: appearance, part of it repeating on every
    street (aliasing); e: per-image appearance noise; w: nuisance with a falling spectrum; n: isotropic noise."""

    def __init__(self, seed):
        import torch
        self.torch = torch
        g = torch.Generator().manual_seed(seed)
        self.omega = torch.randn(LATENT, 3, generator=g, dtype=torch.float64) / LENGTH_SCALE_M
        self.phase = torch.rand(LATENT, generator=g, dtype=torch.float64) * 2 * np.pi
        self.signal = torch.linalg.qr(torch.randn(FULL_DIM, LATENT, generator=g))[0].T.contiguous()  # [r, D]
        self.nuisance = torch.linalg.qr(torch.randn(FULL_DIM, NUISANCE, generator=g))[0].T.contiguous()
        self.nuisance_scale = torch.linspace(1.5, 0.5, NUISANCE)
        self.nuisance_scale /= self.nuisance_scale.norm()
        self.noise = torch.Generator().manual_seed(seed + 1)

    def appearance(self, looked_at, pitch):
        """Random Fourier features of (looked-at point, pitch): [n, LATENT], |z| ~ 1, similar for nearby points."""
        torch = self.torch
        point = torch.from_numpy(np.concatenate([looked_at, 6.0 * pitch[:, None]], axis=1))
        return (torch.cos(point @ self.omega.T + self.phase) * np.sqrt(2.0 / LATENT)).float()

    def __call__(self, utm, yaw, pitch):
        torch = self.torch
        looked_at = utm + LOOK_DISTANCE_M * np.stack([np.cos(yaw), np.sin(yaw)], axis=1)
        alias = np.stack([looked_at[:, 0] % ALIAS_PERIOD_M, looked_at[:, 1] % STREET_SPACING_M], axis=1)
        z = np.sqrt(1 - ALIAS ** 2) * self.appearance(looked_at, pitch) + ALIAS * self.appearance(alias, pitch)
        z += APPEARANCE_NOISE * torch.randn(len(utm), LATENT, generator=self.noise) / np.sqrt(LATENT)
        w = torch.randn(len(utm), NUISANCE, generator=self.noise) * self.nuisance_scale
        n = torch.randn(len(utm), FULL_DIM, generator=self.noise) / np.sqrt(FULL_DIM)
        x = SIGNAL * z @ self.signal + NUISANCE_GAIN * w @ self.nuisance + NOISE * n
        return torch.nn.functional.normalize(x, dim=1).numpy()


def write_descriptors(path, model, utm, yaw, pitch, dtype, chunk=2048):
    out = DescriptorFile.create(path, len(utm), FULL_DIM, dtype)
    for start in range(0, len(utm), chunk):
        rows = slice(start, start + chunk)
        out[rows] = model(utm[rows], yaw[rows], pitch[rows])
    return out


def step_generate(args):
    rng = np.random.default_rng(0)
    db_utm, db_yaw, db_pitch, q_utm, q_yaw = geometry(rng)
    from scipy.spatial import cKDTree
    positives = cKDTree(db_utm).query_ball_point(q_utm, r=25.0)
    positive_lists = np.empty(len(positives), dtype=object)
    positive_lists[:] = [np.array(sorted(p), dtype=np.int64) for p in positives]
    np.savez(os.path.join(args.workdir, 'geometry.npz'), db_utm=db_utm, q_utm=q_utm, positives=positive_lists)
    model = DescriptorModel(seed=0)
    utm = np.concatenate([db_utm, q_utm])
    yaw = np.concatenate([db_yaw, q_yaw])
    pitch = np.concatenate([db_pitch, rng.integers(0, 2, NUM_QUERIES)])
    write_descriptors(whole_path(args, FULL_DIM), model, utm, yaw, pitch, args.dtype)
    train_utm = rng.uniform(0, 1200, (NUM_TRAIN, 2)) + np.array([585000.0, 600000.0])  # another area
    write_descriptors(os.path.join(args.workdir, 'train_32768.npy'), model, train_utm,
                      rng.uniform(0, 2 * np.pi, NUM_TRAIN), rng.integers(0, 2, NUM_TRAIN), args.dtype)
    return dict(positives_per_query=float(np.mean([len(p) for p in positives])),
                queries_without_positive=int(sum(len(p) == 0 for p in positives)))


def step_whiten(args):
    """Fit PCA whitening 32768 -> 4096 on the training sample (as --mode=pca), then whiten the whole file."""
    from netvlad_toolkit.modes.pca import fit_whitening, whiten_descriptors, whitening_layer
    started = time.time()
    sample = load_descriptor_file(os.path.join(args.workdir, 'train_32768.npy'), NUM_TRAIN, FULL_DIM, False)
    weight, bias, eigenvalues = fit_whitening(sample, PCA_DIM)
    fit_s = time.time() - started
    del sample
    started = time.time()
    whole = load_descriptor_file(whole_path(args, FULL_DIM), None, FULL_DIM, check_values=False)
    whiten_descriptors(whole, whitening_layer(weight, bias), whole_path(args, PCA_DIM), args.dtype)
    return dict(fit_s=fit_s, apply_s=time.time() - started, images=len(whole))


def whole_path(args, dim):
    return os.path.join(args.workdir, f'whole_{dim}.npy')


# ---------------------------------------------------------------------------------------------- searches

def step_search(args, variant):
    """retrieval.search_and_recall, exactly as --mode=test --index X runs it, on the first --queries queries."""
    from netvlad_toolkit.search.retrieval import search_and_recall
    dim = FULL_DIM if variant.endswith('32k') else PCA_DIM
    index = variant[:-len('32k')] if variant.endswith('32k') else variant[:-len('4096')]
    index = 'flat' if index == 'exact' else index
    geo = np.load(os.path.join(args.workdir, 'geometry.npz'), allow_pickle=True)
    num_db = len(geo['db_utm'])
    whole = load_descriptor_file(whole_path(args, dim), None, dim, check_values=False)
    whole = whole.view(0, num_db + args.queries)
    opt = SimpleNamespace(cuda=False, index=index, compare_exact=False)
    started = time.time()
    result = search_and_recall(whole, num_db, list(geo['positives'][:args.queries]), opt)
    elapsed = time.time() - started
    np.save(os.path.join(args.workdir, f'predictions_{variant}.npy'), result['predictions'])
    return dict(dim=dim, index=index, queries=args.queries, database=num_db, search_s=elapsed,
                index_build_s=result.get('index_build_s', 0.0), recalls=result['recalls'])


def run_step(args, step):
    """Run one step in a fresh process; its JSON report with its own peak RSS."""
    command = [sys.executable, os.path.abspath(__file__), '--workdir', args.workdir, '--dtype', args.dtype,
               '--queries', str(args.queries), '--step', step]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    report = json.loads(output.strip().splitlines()[-1])
    print(f'{step}: {json.dumps(report)}', flush=True)
    return report


def agreement(args, variant, reference):
    """Share of queries whose top-1 and top-25 sets agree with the reference variant's."""
    mine = np.load(os.path.join(args.workdir, f'predictions_{variant}.npy'))
    ref = np.load(os.path.join(args.workdir, f'predictions_{reference}.npy'))
    top25 = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(mine, ref)])
    return dict(top1_same=float(np.mean(mine[:, 0] == ref[:, 0])), top25_overlap=float(top25))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16'])
    parser.add_argument('--queries', type=int, default=NUM_QUERIES, help='search this many of the 8,280 queries')
    parser.add_argument('--variants', nargs='+', default=VARIANTS, choices=VARIANTS)
    parser.add_argument('--step', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--cleanup', action='store_true', help='delete --workdir at the end')
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.step is not None:  # a child process: one step, one JSON line
        started = time.time()
        if args.step == 'generate':
            report = step_generate(args)
        elif args.step == 'whiten':
            report = step_whiten(args)
        else:
            report = step_search(args, args.step)
        report.update(step=args.step, wall_s=time.time() - started,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
        print(json.dumps(report))  # keys become strings, as the driver reads them
        return
    print(f'free disk in {args.workdir}: {shutil.disk_usage(args.workdir).free / 1e9:.0f} GB; '
          f'{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}', flush=True)
    path = os.path.join(args.workdir, 'bench_scale.json')
    reports = {}
    if os.path.isfile(path):  # a rerun of some steps keeps the others' reports
        with open(path) as f:
            reports = json.load(f)
    if not os.path.isfile(whole_path(args, FULL_DIM)):
        reports['generate'] = run_step(args, 'generate')
    if any(v.endswith('4096') for v in args.variants) and not os.path.isfile(whole_path(args, PCA_DIM)):
        reports['whiten'] = run_step(args, 'whiten')
    for variant in args.variants:
        reports[variant] = run_step(args, variant)
    for variant, reference in (('exact4096', 'exact32k'), ('ivfpq4096', 'exact4096'), ('hnsw4096', 'exact4096')):
        if variant in args.variants and reference in reports:
            reports[variant]['agreement_with_' + reference] = agreement(args, variant, reference)
    for variant in args.variants:  # query time grows with the queries; an index is built once
        r = reports[variant]
        query_s = r['search_s'] - r['index_build_s']
        r['search_s_all_queries'] = r['index_build_s'] + query_s * NUM_QUERIES / r['queries']
    with open(path, 'w') as f:
        json.dump(reports, f, indent=2)
    print(f'\n{"variant":<12}{"peak RSS GB":>12}{"build s":>9}{"search s":>10}{"R@1":>8}{"R@5":>8}{"R@10":>8}'
          f'{"R@20":>8}')
    for variant in [v for v in VARIANTS if v in reports]:
        r = reports[variant]
        print(f'{variant:<12}{r["peak_rss_gb"]:>12.2f}{r["index_build_s"]:>9.1f}{r["search_s"]:>10.1f}' +
              ''.join(f'{r["recalls"][str(n)]:>8.4f}' for n in (1, 5, 10, 20)))
    print(f'reports in {path}')
    if args.cleanup:
        shutil.rmtree(args.workdir)


if __name__ == '__main__':
    main()
