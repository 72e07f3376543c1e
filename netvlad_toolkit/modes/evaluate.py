"""--mode=test: Recall@N of a run (or of the untrained, cluster-initialised network) on a split.

The extraction, search and recall are retrieval.py's. Under torchrun each process writes its share of the
descriptors (extract_part), and `--descriptors PART...` merges the parts and searches them in one process.
"""
import argparse
import csv
import hashlib
import logging
import os
import shlex
import time

import numpy as np
import torch
from torch.utils.data import Subset

from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.datasets.folder_dataset import evaluation_name, two_folders
from netvlad_toolkit.datasets.msls import write_predictions
from netvlad_toolkit.runs.figures import retrieval_strips
from netvlad_toolkit.runs.results import record_result, variant_of
from netvlad_toolkit.runs.runs import load_model, open_database_run, place_model, stored_flags
from netvlad_toolkit.search.descriptors import DescriptorFile, cache_folder, open_parts, part_name, part_rows
from netvlad_toolkit.search.global_features import extraction_settings
from netvlad_toolkit.search.patch_netvlad import (
    check_first_image,
    extract_jointly,
    flags_config,
    patch_projection,
    rerank_candidates,
)
from netvlad_toolkit.search.retrieval import RECALL_NS, evaluate, extract_descriptors, log_recalls, search_and_recall
from netvlad_toolkit.utils.commons import (
    UserError,
    atomic_write,
    atomic_write_json,
    make_deterministic,
    select_device,
    torchrun_process,
)
from netvlad_toolkit.utils.options import AT_LEAST_0, add_evaluating_flags, add_latency_flags, add_rerank_flags

PICTURE_QUERIES = 10  # --save_predictions: queries shown in the picture
STORE_FOLDER = 'patch_features'  # RUN/patch_features/<split>: the database's Patch-NetVLAD store of --rerank patch


def add_flags(p):
    add_evaluating_flags(p)
    add_latency_flags(p, optional=True)
    add_rerank_flags(p)
    test = p.add_argument_group('test')
    test.add_argument('--database_folder', default=None,
                      help='A folder of database images named @UTM_east@UTM_north@...@.jpg, evaluated against '
                           '--queries_folder instead of a split of --dataPath.')
    test.add_argument('--queries_folder', default=None, help='The query images for --database_folder.')
    test.add_argument('--save_predictions', type=AT_LEAST_0, default=0, metavar='N',
                      help='Write each query\'s top N database images with their descriptor distance and distance in '
                           'metres (<run>/predictions_<split>.csv), and a picture of the first queries with their '
                           'retrievals (green within the positive threshold, red beyond).')
    test.add_argument('--database_run', default=None, metavar='RUN',
                      help='Asymmetric search: describe the database images with this run (e.g. the teacher of a '
                           '--mode=distill student) and the queries with --resume.')
    test.add_argument('--descriptors', nargs='+', default=None, metavar='PART',
                      help='Search the descriptor parts that test mode under torchrun wrote '
                           '(<split>_<dim>d_partRRRofWWW.npy, all of them) instead of extracting.')


def open_descriptor_parts(paths, split, dataset, dim):
    """The descriptor files that a sharded extraction (torchrun, see extract_part) wrote, checked, as one array."""
    started = time.time()
    whole = open_parts(paths, split, len(dataset), dim)
    logging.info('Checked %d descriptor parts (%d x %d %s) in %.1f s', len(whole.files), len(dataset), dim,
                 whole.dtype.name, time.time() - started)
    return whole


def extract_part(model, dataset, opt, device, rank, world):
    """This process's contiguous share of the split's images, as a descriptor file in --cachePath."""
    if not opt.cachePath:
        raise UserError(f'Under torchrun (WORLD_SIZE={world}) --mode=test writes each process\'s share of the '
                        f'descriptors to --cachePath and leaves the search to one later command: give --cachePath, '
                        f'a folder on a filesystem all machines share (or copy the parts to one machine).')
    start, stop = part_rows(len(dataset), rank, world)
    path = os.path.join(opt.cachePath, part_name(opt.split, model.output_dim, rank, world))
    partial = path[:-len('.npy')] + '.partial'
    started = time.time()
    extract_descriptors(model, Subset(dataset, range(start, stop)), opt, device,
                        f'{opt.split} part {rank}/{world}', path=partial)
    os.replace(partial, path)  # a killed process leaves no file that looks complete
    prefix, suffix = os.path.join(opt.cachePath, part_name(opt.split, model.output_dim, 0, world)).split('part000')
    logging.info('====> Part %d of %d: descriptors of images %d..%d of %d written to %s in %.1f s. When all %d '
                 'parts are written, search them in one process (without torchrun) with: %s --descriptors %spart*%s',
                 rank, world, start, stop, len(dataset), path, time.time() - started, world, opt.command,
                 shlex.quote(prefix), shlex.quote(suffix))
    return dict(part=path, rows=[start, stop], world=world)


def test(opt):
    make_deterministic(opt.seed)
    device = select_device(opt)
    rank, world = torchrun_process()
    if world > 1 and device.type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    rerank = flags_config(opt)
    dataset = load_dataset(opt, opt.split, images=not opt.descriptors or rerank is not None)
    model, checkpoint, run_dir = load_model(opt)
    model, device = place_model(model, device)
    db_model, db_name = database_model(opt, model, rerank, world, device)
    if world > 1:
        return extract_part(model, dataset, opt, device, rank, world)
    split = evaluation_name(opt)
    named = argparse.Namespace(**dict(vars(opt), split=split, dataset='folder' if two_folders(opt) else opt.dataset))
    logging.info('Testing %s on %s split %s (%s): %d database images, %d queries', run_dir, named.dataset, split,
                 dataset.db_struct.name, dataset.db_struct.numDb, dataset.db_struct.numQ)
    parts = opt.descriptors and open_descriptor_parts(opt.descriptors, opt.split, dataset, model.output_dim)
    result = recall_at_n(model, dataset, device, opt.cacheBatchSize, opt.precision, opt.threads, opt.index,
                         opt.compare_exact, opt.desc_dtype, opt.cachePath, opt.save_predictions, parts, rerank,
                         opt.output_features_dir or os.path.join(run_dir, STORE_FOLDER, split), run_dir,
                         db_model)
    predictions, distances = result.pop('predictions'), result.pop('distances')
    stem = result_stem(opt, split, rerank, run_dir)
    if opt.save_predictions:
        save_predictions(dataset, predictions, distances, opt.save_predictions, run_dir, stem,
                         picture=not opt.descriptors)
    if opt.dataset == 'msls' and not opt.database_folder:
        save_msls_predictions(dataset, predictions, run_dir, stem)
    result.update(split=split, dataset=named.dataset, dataPath=opt.dataPath, run=run_dir, precision=opt.precision,
                  device=str(device), **encoders_of(opt, run_dir, checkpoint, db_name))
    path = os.path.join(run_dir, f'test_{stem}.json')
    atomic_write_json(result, path)
    record_result(named, model, checkpoint, run_dir, result)
    logging.info('Tested %d images%s; results in %s', len(dataset),
                 f' at {result["images_per_s"]:.1f} images/s' if result['images_per_s'] else '', path)
    return dict(result, predictions=predictions)


def result_stem(opt, split, rerank, run_dir):
    """What names a test's files in the run folder (test_<stem>.json, predictions_<stem>.csv): the split, then,
    where they are not the run's own, the dataset (named by its data folder), the approximate index and the
    re-ranking config, so that no evaluation replaces the file of another. The run's own dataset (its flags.json's)
    searched exactly keeps the plain test_<split>.json that users' scripts read. A run without flags.json records
    no dataset of its own (imported and reference-port runs; the off-the-shelf network is initialised from the
    centroids of the dataset it is tested on): its dataset is the one tested, as before. A search of another run's
    database (--database_run) is named apart too."""
    stored = stored_flags(run_dir)
    where = data_location(opt)
    parts = [split]
    if 'dataset' in stored and where != data_location(argparse.Namespace(**stored)) and not two_folders(opt):
        folder = os.path.basename(os.path.abspath(opt.dataPath))
        parts.append(f'{opt.dataset}-{folder}-{hashlib.sha1(repr(where).encode()).hexdigest()[:6]}')
    if opt.index != 'flat':
        parts.append(opt.index)
    if rerank is not None:
        parts += ['rerank', rerank.name]
    if opt.database_run:
        parts.append('asymmetric')
    return '_'.join(parts)


def data_location(flags):
    """(dataset, absolute data folder, absolute images folder) of a dataset's flags."""
    return (flags.dataset, *(os.path.abspath(path) if path else None
                             for path in (flags.dataPath, getattr(flags, 'imagesPath', None))))


def recall_at_n(model, dataset, device='cpu', batch_size=24, precision='fp32', threads=0, index='flat',
                compare_exact=False, desc_dtype='float32', cache_path=None, save_predictions=0, descriptors=None,
                rerank=None, store_dir=None, run='', db_model=None):
    """The test step: Recall@N of `model` on a whole-set dataset (datasets.load_dataset), each query searched among
    the database images. descriptors: the whole set's descriptors when extracted already (open_descriptor_parts),
    else they are extracted. rerank: a patch_netvlad.RerankConfig: each query's first rerank.num_candidates are
    re-ranked by their patch score, with the database's patch store in store_dir (`run` names the model in its
    errors). The other parameters are the flags of the same names (batch_size: --cacheBatchSize, cache_path:
    --cachePath, save_predictions: how many predictions to keep at least). Returns recalls, curve, predictions,
    distances, the timings and, when re-ranked, its summary (`rerank`). db_model: the model that describes the
    database images when it is not `model` (asymmetric search)."""
    device = torch.device(device)
    settings = argparse.Namespace(**vars(extraction_settings(device, batch_size, precision, threads)), index=index,
                                  compare_exact=compare_exact, desc_dtype=desc_dtype, cachePath=cache_path,
                                  save_predictions=save_predictions)
    if rerank is not None and descriptors is None:
        result, summary = evaluate_reranked(model, dataset, settings, device, rerank, store_dir, run)
    elif descriptors is None:
        result = evaluate(model, dataset, settings, device, db_model=db_model)
    else:
        reranker, summary = patch_reranker(model, dataset, rerank, store_dir, device, settings, run)
        top = rerank.num_candidates if rerank else 0
        result = dict(search_and_recall(descriptors, dataset.db_struct.numDb, dataset.positives(), settings,
                                        dataset.db_struct, reranker, top), extraction_s=None, images_per_s=None)
    if rerank is not None:
        result['rerank'] = dict(summary, global_recalls=result.pop('global_recalls'))
        logging.info('Recall@N of the global search before re-ranking: %s',
                     ', '.join(f'R@{n} {r:.4f}' for n, r in result['rerank']['global_recalls'].items()))
        logging.info('Re-ranked the top %d candidates of each query with Patch-NetVLAD (%s, %s): %.0f ms per query '
                     '(patch extraction %.0f, reading %.0f, matching %.0f); the store of %d database images in %s',
                     summary['candidates'], rerank.name, rerank.matcher, 1000 * summary['seconds_per_query'],
                     1000 * summary['extraction_s_per_query'], 1000 * summary['reading_s_per_query'],
                     1000 * summary['matching_s_per_query'], dataset.db_struct.numDb, summary['store'])
    log_recalls(result['recalls'])
    return result


def database_model(opt, model, rerank, world, device):
    """(model, name) of --database_run on `device` (None, None without it), checked to describe images in
    descriptors of `model`'s dimension."""
    if not opt.database_run:
        return None, None
    if rerank is not None or opt.descriptors or world > 1:
        raise UserError('--database_run extracts the database with another model in this one process: it cannot be '
                        'combined with --rerank, --descriptors or torchrun.')
    db_model, db_checkpoint = open_database_run(opt, model)
    return place_model(db_model, device)[0], f'{db_model.arch} {variant_of(db_checkpoint)}'


def encoders_of(opt, run_dir, checkpoint, db_name):
    """Which model described which side: the results record's `query_encoder` and `database_encoder` (run folder
    and name), and the teacher of a distilled run."""
    teacher = {'teacher': checkpoint['teacher']} if checkpoint and 'teacher' in checkpoint else {}
    if db_name is None:
        return teacher
    return dict(teacher, query_encoder=dict(run=run_dir, name=f'{opt.arch} {variant_of(checkpoint)}'),
                database_encoder=dict(run=opt.database_run, name=db_name))


def patch_reranker(model, dataset, config, store_dir, device, settings, run, query_store=None):
    """(a function re-ranking [Q, n] candidates of the dataset's queries, the summary it fills), or (None, None)
    without a config. query_store: extract_jointly's, when the stores are written already."""
    if config is None:
        return None, None
    patch_projection(model, config.pca_dim)  # a run that cannot give patch descriptors stops before any work
    num_db = dataset.db_struct.numDb
    database, queries = Subset(dataset, range(num_db)), Subset(dataset, range(num_db, len(dataset)))
    if query_store is None:
        check_first_image(model, database, config)  # patches that cannot be placed stop before extraction
    summary = {}

    def rerank(candidates):
        reranked, _, done = rerank_candidates(model, database, dataset.db_struct.db_paths, queries, candidates,
                                              store_dir, config, device, settings.precision,
                                              settings.cacheBatchSize, settings.threads, run, query_store=query_store)
        summary.update(done)
        return reranked
    return rerank, summary


def evaluate_reranked(model, dataset, settings, device, config, store_dir, run):
    """retrieval.evaluate with Patch-NetVLAD re-ranking, each image through the encoder once: the global
    descriptors, the database's patch store (in store_dir) and the queries' patches (in a temporary store beside
    the descriptors) from one pass (extract_jointly); then the search, and the re-ranking from the stores.
    Returns (the result, the re-ranking's summary)."""
    patch_projection(model, config.pca_dim)
    num_db, struct = dataset.db_struct.numDb, dataset.db_struct
    database, queries = Subset(dataset, range(num_db)), Subset(dataset, range(num_db, len(dataset)))
    with cache_folder(settings.cachePath) as folder:
        started = time.time()
        whole = DescriptorFile.create(os.path.join(folder, f'{dataset.split}.npy'), len(dataset), model.output_dim,
                                      settings.desc_dtype)
        query_store = extract_jointly(model, database, struct.db_paths, queries, struct.query_paths, store_dir,
                                      folder, config, device, whole, settings.precision, settings.cacheBatchSize,
                                      settings.threads, run)
        extraction_s = time.time() - started
        reranker, summary = patch_reranker(model, dataset, config, store_dir, device, settings, run, query_store)
        result = search_and_recall(whole, num_db, dataset.positives(), settings, struct, reranker,
                                   config.num_candidates)
    return dict(result, extraction_s=extraction_s, images_per_s=len(dataset) / extraction_s), summary


def save_predictions(dataset, predictions, distances, top_n, run_dir, stem, picture=True):
    """<run>/predictions_<stem>.csv (stem: result_stem; each query's top_n database images, descriptor distance,
    metres) and, unless picture=False (no images at hand: --descriptors), .png."""
    struct = dataset.db_struct
    path = os.path.join(run_dir, f'predictions_{stem}.csv')

    def write(f):
        writer = csv.writer(f)
        writer.writerow(['query_index', 'query_image', 'rank', 'database_index', 'database_image',
                         'descriptor_distance', 'metres', 'within_threshold'])
        for query, ranked in enumerate(predictions[:, :top_n]):
            found = ranked[ranked >= 0]
            metres = np.linalg.norm(struct.utmDb[found] - struct.utmQ[query], axis=1)
            for rank, (db_index, distance, m) in enumerate(zip(found, distances[query], metres), 1):
                writer.writerow([query, struct.query_paths[query], rank, db_index, struct.db_paths[db_index],
                                 f'{distance:.6f}', f'{m:.2f}', int(m <= struct.posDistThr)])
    atomic_write(path, write, mode='w')
    logging.info('Top-%d predictions of every query in %s', top_n, path)
    if picture:
        picture_path = os.path.join(run_dir, f'predictions_{stem}.png')
        retrieval_strips(dataset, predictions, range(min(PICTURE_QUERIES, struct.numQ)), picture_path)
        logging.info('The first %d queries and their retrievals pictured in %s', min(PICTURE_QUERIES, struct.numQ),
                     picture_path)


def save_msls_predictions(dataset, predictions, run_dir, stem):
    """The predictions file mapillary_sls's evaluate.py reads, for the scored queries (those with a positive)."""
    struct = dataset.db_struct
    scored = [q for q, p in enumerate(dataset.positives()) if len(p) > 0]
    path = os.path.join(run_dir, f'msls_predictions_{stem}.csv')
    os.makedirs(run_dir, exist_ok=True)
    write_predictions(path, [struct.query_paths[q] for q in scored], struct.db_paths,
                      predictions[scored, :max(RECALL_NS)])
    logging.info('MSLS predictions (top %d of %d queries) in %s: python evaluate.py --prediction %s --msls-root ROOT '
                 '--cities cph,sf in mapillary_sls scores them', max(RECALL_NS), len(scored), path, path)
