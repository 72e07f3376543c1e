"""--mode=query: where were these photos taken? Each photo of --query is searched against a database of images and
answered with its top --num_matched database images, in a CSV and a picture.

The database (--database) is a global-feats .h5 written by --mode=extract, or a folder of images: a folder is
extracted once into the run folder (query_database/<folder>_<hash>/global-feats-netvlad.h5) and later queries
extract only the images added since. Similarity is the dot product of the unit descriptors
(retrieval.top_k_by_dot).

Where database positions are known (--positions CSV, or folder-format names `@east@north@...`), each retrieval's
CSV row carries its position, and the query's estimated position is the position of its best-ranked retrieval that
has one (the top-1 in the usual case): an average of several retrievals could fall between two distinct places.
"""
import collections
import csv
import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from netvlad_toolkit.datasets.folder_dataset import utm_from_filename
from netvlad_toolkit.runs.figures import patch_matches, query_strip
from netvlad_toolkit.runs.runs import load_model, open_database_run, place_model
from netvlad_toolkit.search.descriptors import cache_folder, load_descriptor_file
from netvlad_toolkit.search.global_features import (
    PhotoList,
    cache_path,
    describe_images,
    descriptor_dim,
    extract_folder,
    extraction_settings,
    find_images,
    h5_names,
    path_key,
    read_descriptors,
    readable_indices,
)
from netvlad_toolkit.search.patch_netvlad import (
    build_store,
    check_first_image,
    flags_config,
    matched_points,
    patch_projection,
    rerank_candidates,
    store_features,
)
from netvlad_toolkit.search.retrieval import reorder_first, top_k_by_dot
from netvlad_toolkit.utils.commons import (
    UserError,
    atomic_write,
    atomic_write_text,
    make_deterministic,
    plural,
    select_device,
    user_error_text,
)
from netvlad_toolkit.utils.options import AT_LEAST_1, add_describing_flags, add_image_folder_flags, add_rerank_flags

DEFAULT_TOP = 5
CACHE_FOLDER = 'query_database'  # in the run folder: the extracted database folders
SUMMARY = 'queries'  # <out>/queries.csv: each query's best match, beside the per-query answers
MATCHES_FOLDER = 'patch_matches'  # <out>/patch_matches/<stem>.png: --rerank patch's matched patches of each query
MATCHES_DRAWN = 3  # re-ranked candidates drawn per query


def add_flags(p):
    add_describing_flags(p)
    group = p.add_argument_group('query')
    group.add_argument('--query', nargs='+', required=True, metavar='PHOTO',
                       help='Your photos: image files and/or folders (searched recursively).')
    group.add_argument('--database', required=True,
                       help='The database: a global-feats .h5 written by --mode=extract, or a folder of images '
                            '(extracted once, then cached in the run folder for later queries).')
    group.add_argument('--database_run', default=None, metavar='RUN',
                       help='Asymmetric search: a folder --database is described by this run (e.g. the teacher of a '
                            '--mode=distill student; cached in its run folder) and the photos by --resume.')
    group.add_argument('--positions', default=None,
                       help='CSV of database positions with a header, columns name,east,north (metres) or '
                            'name,lat,lon. Default: positions read from folder-format names (@east@north@... as in '
                            'VPR-datasets-downloader), where the names have them.')
    group.add_argument('--num_matched', type=AT_LEAST_1, default=DEFAULT_TOP, help='Retrievals listed per query.')
    group.add_argument('--export_dir', default=None,
                       help='Folder of the results (default: query_results under --runsPath).')
    group.add_argument('--image_dir', default=None,
                       help='With --database FILE.h5: the folder of the database images, for the pictures (and '
                            'for --rerank patch, which matches them).')
    add_image_folder_flags(group)
    add_rerank_flags(p)


Request = collections.namedtuple('Request', 'photos database names positions columns')


def query(opt):
    make_deterministic(opt.seed)
    rerank = flags_config(opt)
    request = check_request(opt.query, opt.database, opt.num_matched, opt.positions, rerank, opt.image_dir)
    model, _, run_dir = load_model(opt)
    model, device = place_model(model, select_device(opt))
    db_side = database_side(opt, model, rerank, device)
    return answer_request(model, request, opt.export_dir or os.path.join(opt.runsPath, 'query_results'), run_dir,
                          device, opt.num_matched, opt.image_dir, opt.cacheBatchSize, opt.precision, opt.threads,
                          opt.resize_max, opt.skip_unreadable, opt.as_half, rerank, opt.output_features_dir, db_side)


def database_side(opt, model, rerank, device):
    """(model, run folder) of --database_run, which describes a folder --database; None without it."""
    if not opt.database_run:
        return None
    if rerank is not None:
        raise UserError('--database_run cannot be combined with --rerank (the patches of the database and of the '
                        'photos would come from different networks).')
    db_model, _ = open_database_run(opt, model)
    logging.info('Asymmetric search: database images described by %s, photos by %s', opt.database_run, opt.resume)
    return place_model(db_model, device)[0], opt.database_run


def query_images(model, query, database, export_dir, run_dir, device='cpu', num_matched=DEFAULT_TOP, positions=None,
                 image_dir=None, batch_size=24, precision='fp32', threads=0, resize_max=None, skip_unreadable=False,
                 as_half=False, rerank=None, store_dir=None):
    """The query step: each photo of `query` (image files and folders) answered with its top num_matched images of
    `database` (a global-feats .h5, or a folder of images extracted once into run_dir's cache), in export_dir.
    rerank: a patch_netvlad.RerankConfig whose first rerank.num_candidates candidates are re-ordered by their patch
    score (the database's patch store in store_dir, default beside its global descriptors; image_dir: the folder of
    an .h5 database's images). The other parameters are the flags of the same names (batch_size:
    --cacheBatchSize, positions: --positions). Returns each query's answer (its retrievals and estimated position)."""
    request = check_request(query, database, num_matched, positions, rerank, image_dir)
    return answer_request(model, request, export_dir, run_dir, torch.device(device), num_matched, image_dir,
                          batch_size, precision, threads, resize_max, skip_unreadable, as_half, rerank, store_dir)


def check_request(query, database, num_matched, positions_csv, rerank=None, image_dir=None):
    """The query photos, the database and its positions, checked before any work (a Request)."""
    photos = query_photos(query)
    names = check_database(database)
    if rerank is not None and not os.path.isdir(database) and not image_dir:
        raise UserError(f'--rerank patch matches the database images themselves: with --database {database} (a '
                        f'descriptor file) give --image_dir, the folder of its images.')
    if num_matched > len(names):
        raise UserError(f'--num_matched {num_matched} is larger than the database: {database} holds {len(names)} '
                        f'images.')
    positions, columns = database_positions(names, positions_csv)
    return Request(photos, database, names, positions, columns)


def answer_request(model, request, out, run_dir, device, top, image_dir, batch_size, precision, threads, resize_max,
                   skip_unreadable, as_half, rerank, store_dir, db_side=None):
    """query_images after its checks; db_side: (model, run folder) that describe the database, when not these."""
    db_model, db_run = db_side or (model, run_dir)
    settings = extraction_settings(device, batch_size, precision, threads, as_half, resize_max, skip_unreadable)
    if rerank is not None:
        patch_projection(model, rerank.pca_dim)  # a run that cannot give patch descriptors stops before any work
    known = None
    if rerank is not None and os.path.isdir(request.database):
        known = describe_folder_jointly(model, request, settings, device, rerank, store_dir, run_dir)
    db_file, db_names, db_root = database(db_model, request.database, image_dir, settings, device, db_run,
                                          request.names, known)
    photos = request.photos
    with cache_folder(prefix='netvlad_query_patches_') as folder:
        if rerank is None:
            kept, query_desc = describe_images(model, [path for _, path in photos], settings, device)
        else:
            kept, query_desc, query_store = describe_photos_jointly(model, photos, settings, device, rerank, folder,
                                                                    run_dir)
        if not kept:
            raise UserError(f'None of the {len(photos)} query photos could be read.')
        db_desc = database_rows(db_file, db_names, model.output_dim, os.path.join(db_run, CACHE_FOLDER))
        scores, found = top_k_by_dot(query_desc, db_desc, max(top, rerank.num_candidates if rerank else 0))
        if rerank is not None:
            candidates = found[:, :rerank.num_candidates]
            reranked, _, summary = rerank_candidates(
                model, PhotoList([os.path.join(db_root, n) for n in db_names], resize_max), db_names, None,
                candidates, store_dir or os.path.dirname(os.path.abspath(db_file)), rerank, device, precision, 1,
                threads, run_dir, match_drawer(rerank, [photos[q] for q in kept], db_root, db_names, out),
                query_store)
            scores, found = reorder_first(scores, found, reranked)
            logging.info('Re-ranked the top %d candidates of each query with Patch-NetVLAD (%s, %s): %.0f ms per '
                         'query; the patch store of the database in %s', summary['candidates'], rerank.name,
                         rerank.matcher, 1000 * summary['seconds_per_query'], summary['store'])
    answers = [answer(photos[q], scores[row, :top], found[row, :top], db_names, request.positions)
               for row, q in enumerate(kept)]
    write_answers(answers, request.columns, db_root, out)
    logging.info('====> Answered %s against %d database images: %s', plural(len(answers), 'query', 'queries'),
                 len(db_names), out)
    return answers


def describe_folder_jointly(model, request, settings, device, config, store_dir, run_dir):
    """With --rerank patch, a database folder whose cache lacks images: its patch store (beside the cache, or in
    store_dir) built or extended first, each image's global descriptor from the same pass, so that extracting
    the cache encodes none of them again. Returns {name: global descriptor} of the images that pass encoded
    (None when the cache holds every image: the store is then built by the re-ranking's own pass)."""
    path = cache_path(os.path.join(run_dir, CACHE_FOLDER), request.database)
    cached = set(h5_names(path)) if os.path.isfile(path) else set()
    paths = [os.path.join(request.database, name) for name in request.names]
    readable = readable_indices(paths, settings.skip_unreadable)
    names = [request.names[i] for i in readable]
    if not readable or cached.issuperset(names):
        return None
    descriptors = np.empty((len(names), model.output_dim), dtype=np.float32)
    check_first_image(model, PhotoList([paths[readable[0]]], settings.resize_max), config)
    try:
        build_store(model, PhotoList([paths[i] for i in readable], settings.resize_max), names,
                    store_dir or os.path.dirname(os.path.abspath(path)), config, device, settings.precision, 1,
                    settings.threads, run_dir, descriptors=descriptors)
    except UserError as error:  # an image that cannot be decoded, for one
        if not settings.skip_unreadable:
            raise
        logging.warning('%s With --skip_unreadable the database is described by its own pass, which leaves out '
                        'what cannot be read, and its patch store completed by a second one.', user_error_text(error))
        return None
    return dict(zip(names, descriptors))


def describe_photos_jointly(model, photos, settings, device, config, folder, run_dir):
    """describe_images of the query photos with --rerank patch: each readable photo through the encoder once, its
    global descriptor and its patches (into a float32 store in `folder`) from the same pass. Returns (indices of
    the photos described, their descriptors [n, D], rerank_candidates' query_store)."""
    paths = [path for _, path in photos]
    kept = readable_indices(paths, settings.skip_unreadable)
    descriptors = np.empty((len(kept), model.output_dim), dtype=np.float32)
    if not kept:
        return kept, descriptors, None
    started = time.process_time()
    path = build_store(model, PhotoList([paths[i] for i in kept], settings.resize_max), [paths[i] for i in kept],
                       folder, config, device, settings.precision, 1, settings.threads, run_dir, 'float32',
                       descriptors)
    return kept, descriptors, (path, (time.process_time() - started) / len(kept))


def match_drawer(config, query_photos, db_root, db_names, out):
    """rerank_candidates' on_query: each query's matched patches on its first MATCHES_DRAWN re-ranked candidates,
    drawn into <out>/patch_matches/<stem>.png (written whole or not at all)."""
    def draw(row, query, reranked, store):
        ids = [int(i) for i in reranked[:MATCHES_DRAWN] if i >= 0]
        name, path = query_photos[row]
        rows = [(os.path.join(db_root, db_names[i]), candidate.grid, f'#{rank} {db_names[i]}',
                 matched_points(query, candidate, config))
                for rank, (i, candidate) in enumerate(zip(ids, store_features(store, ids, config)), 1)]
        if rows:
            os.makedirs(os.path.join(out, MATCHES_FOLDER), exist_ok=True)
            patch_matches(path, query.grid, rows, os.path.join(out, MATCHES_FOLDER, answer_stem(name) + '.png'))
    return draw


# ---------------------------------------------------------------------------------------------- inputs

def query_photos(items):
    """[(name, path)] of the query photos: files as given (named by their file name), folders searched
    recursively (named by their path inside the folder)."""
    photos = []
    for item in items:
        if os.path.isdir(item):
            photos += [(name, os.path.join(item, name)) for name in find_images(item, '--query')]
        elif os.path.isfile(item):
            photos.append((os.path.basename(item), item))
        else:
            raise UserError(f'--query {item}: no such file or folder.')
    check_answer_names(photos)
    return photos


def check_answer_names(photos):
    """A UserError, before any work, where two photos' answers would be written to the same files, or a photo's
    to the summary's."""
    answered = {}
    for name, path in photos:
        stem = answer_stem(name)
        key = stem.casefold()  # names that differ only in case are one file on macOS and Windows
        if key == SUMMARY:
            raise UserError(f'Query photo {path} would be answered in {stem}.csv, the file that holds the summary of '
                            f'all queries: rename it.')
        if key in answered:
            raise UserError(f'Query photos {answered[key]} and {path} would both be answered in {stem}.csv and '
                            f'{stem}.png: an answer is named by the photo\'s path inside its --query folder (or its '
                            f'file name), "/" written "__", without its extension, and names that differ only in case '
                            f'are one file on macOS and Windows. Rename one, or query them in separate runs, each with '
                            f'its own --export_dir.')
        answered[key] = path


def answer_stem(name):
    """The file name, without extension, of a query's answers (<stem>.csv, <stem>.png) in the output folder."""
    return str(Path(name).with_suffix('')).replace('/', '__')


def check_database(database):
    """The database image names: those of the .h5, or those found in the folder (extracted later)."""
    if os.path.isdir(database):
        return find_images(database, '--database')
    if not os.path.isfile(database):
        raise UserError(f'--database {database}: no such file or folder.')
    names = h5_names(database)
    if not names:
        raise UserError(f'--database {database} holds no images: not a global-feats file.')
    return names


def database(model, database, image_dir, settings, device, run_dir, names, known=None):
    """(global-feats file, image names, folder of the images or None) of the database, a folder extracted into
    the run folder's cache first (only the images not there yet; those in `known`, {name: descriptor}, from
    there)."""
    if os.path.isdir(database):
        path = cache_path(os.path.join(run_dir, CACHE_FOLDER), database)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        extract_folder(model, database, names, path, settings, device, skip_existing=True, known=known)
        return path, names_in(path, names), database
    dim = descriptor_dim(database, names[0])
    if dim != model.output_dim:
        raise UserError(f'--database {database} holds {dim}-D descriptors but the model of {run_dir} gives '
                        f'{model.output_dim}-D ones: it was extracted with another model.')
    return database, names, image_dir


def database_rows(path, names, dim, cache_root):
    """The descriptors of `names` from global-feats file `path` as contiguous rows (a DescriptorFile), cached in
    cache_root: reading one HDF5 group per image costs about a millisecond each, so the copy is made once and
    remade only when the file or the names change."""
    stamp = os.stat(path)
    key = hashlib.sha1('\n'.join([str(stamp.st_mtime_ns), str(stamp.st_size)] + names).encode()).hexdigest()
    rows_path = os.path.join(cache_root, f'rows_{path_key(path)}.npy')
    key_path = rows_path[:-len('.npy')] + '.key'
    if os.path.isfile(key_path) and open(key_path).read() == key:
        return load_descriptor_file(rows_path, len(names), dim, check_values=False)
    os.makedirs(cache_root, exist_ok=True)
    read_descriptors(path, names, dim, rows_path + '.tmp')
    os.replace(rows_path + '.tmp', rows_path)
    atomic_write_text(key, key_path)
    return load_descriptor_file(rows_path, len(names), dim, check_values=False)


def names_in(path, names):
    """The names that the file holds (images skipped as unreadable are not in it)."""
    held = set(h5_names(path))
    return [name for name in names if name in held]


def database_positions(names, positions_csv):
    """({name: (a, b)}, (column a, column b)) from --positions, else from folder-format names; ({}, None) when
    neither gives any."""
    if positions_csv:
        return read_positions_csv(positions_csv, names)
    positions = {}
    for name in names:
        try:
            positions[name] = utm_from_filename(name)
        except UserError:  # not a folder-format name: no position
            continue
    return (positions, ('east', 'north')) if positions else ({}, None)


def read_positions_csv(path, names):
    """Positions of the database images from a CSV with a header: name,east,north or name,lat,lon."""
    if not os.path.isfile(path):
        raise UserError(f'--positions {path}: no such file.')
    try:
        with open(path, newline='', encoding='utf-8') as f:
            positions, columns = read_position_rows(csv.DictReader(f), path)
    except UnicodeDecodeError as error:
        raise UserError(f'--positions {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as a '
                        f'UTF-8 CSV.') from None
    known = [name for name in names if name in positions]
    if not known:
        raise UserError(f'--positions {path} names none of the {len(names)} database images (names are paths '
                        f'relative to the database folder, e.g. {names[0]}).')
    return {name: positions[name] for name in known}, columns


# ---------------------------------------------------------------------------------------------- outputs

def read_position_rows(reader, path):
    """({name: (a, b)}, (column a, column b)) of a positions CSV's rows; the header names the columns."""
    header = [field.strip() for field in reader.fieldnames or []]
    columns = next((pair for pair in (('east', 'north'), ('lat', 'lon')) if set(pair) <= set(header)), None)
    if 'name' not in header or columns is None:
        raise UserError(f'--positions {path} has the header {",".join(header)}; expected name,east,north '
                        f'(metres) or name,lat,lon.')
    positions = {}
    for line, row in enumerate(reader, 2):
        if None in row:
            raise UserError(f'--positions {path}, line {line}: more values than the header has columns '
                            f'({",".join(header)}).')
        row = {key.strip(): value for key, value in row.items()}
        try:
            position = (float(row[columns[0]]), float(row[columns[1]]))
        except (TypeError, ValueError):
            position = None
        if position is None or not all(map(math.isfinite, position)):
            raise UserError(f'--positions {path}, line {line}: {columns[0]} and {columns[1]} must be finite '
                            f'numbers.')
        positions[row['name'].strip()] = position
    return positions, columns


def answer(photo, scores, found, db_names, positions):
    """One query's retrievals (rank, name, similarity, position or None) and its estimated position."""
    retrievals = [(rank, db_names[index], float(score), positions.get(db_names[index]))
                  for rank, (score, index) in enumerate(zip(scores, found), 1)]
    estimate = next((position for *_, position in retrievals if position is not None), None)
    return dict(name=photo[0], path=photo[1], retrievals=retrievals, estimate=estimate)


def write_answers(answers, columns, db_root, out):
    """Per query: <stem>.csv (its top N) and <stem>.png (the query, then its retrievals); queries.csv: each query's
    best match and estimated position. Every file is written whole or not at all, and queries.csv last: the old
    one is removed first, so a killed run leaves no summary that vouches for a mix of old and new answers."""
    summary_path = os.path.join(out, SUMMARY + '.csv')
    if os.path.exists(summary_path):
        os.remove(summary_path)
    position_columns = list(columns) if columns else []
    summary = [['query', 'best_match', 'similarity'] + [f'estimated_{c}' for c in position_columns]]
    for item in answers:
        stem = os.path.join(out, answer_stem(item['name']))
        rows = [['rank', 'database_image', 'similarity'] + position_columns]
        rows += [[rank, name, f'{score:.6f}'] + position_cells(position, columns)
                 for rank, name, score, position in item['retrievals']]
        write_csv(stem + '.csv', rows)
        _, best, score, _ = item['retrievals'][0]
        summary.append([item['name'], best, f'{score:.6f}'] + position_cells(item['estimate'], columns))
        write_picture(item, db_root, stem + '.png')
    write_csv(summary_path, summary)


def write_picture(item, db_root, path):
    """The query and its retrievals in a row, drawn in a scratch folder and copied into place by atomic_write:
    figures.query_strip saves to a file name (the format follows its extension), not into an open file."""
    retrieved = [os.path.join(db_root, name) if db_root else None for _, name, _, _ in item['retrievals']]
    captions = [f'#{rank} {score:.3f}' for rank, _, score, _ in item['retrievals']]
    with tempfile.TemporaryDirectory() as scratch:
        drawn = os.path.join(scratch, os.path.basename(path))
        query_strip(item['path'], retrieved, captions, drawn)
        with open(drawn, 'rb') as picture:
            atomic_write(path, lambda f: shutil.copyfileobj(picture, f))


def position_cells(position, columns):
    if not columns:
        return []
    return ['', ''] if position is None else [repr(position[0]), repr(position[1])]


def write_csv(path, rows):
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
