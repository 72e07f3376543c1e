"""--mode=pairs: the image pairs file of hloc's pairs_from_retrieval, from global-feats files (--mode=extract's
or hloc's own).

Each query is paired with its --num_matched most similar database images by dot product (the descriptors are unit
vectors), highest first; as hloc does, a database image of the query's own name is never its match and pairs of
negative similarity are dropped (hloc's min_score=0), so a query may get fewer pairs. The search runs in chunks
over both sides (retrieval.top_k_by_dot): memory does not grow with the number of images.
"""
import glob
import logging
import os

import numpy as np

from netvlad_toolkit.search.descriptors import cache_folder
from netvlad_toolkit.search.global_features import descriptor_dim, h5_names, read_descriptors
from netvlad_toolkit.search.retrieval import top_k_by_dot
from netvlad_toolkit.utils.commons import UserError, atomic_write
from netvlad_toolkit.utils.options import AT_LEAST_1, add_cache_path_flag, add_common_flags

MIN_SCORE = 0.0  # hloc's pairs_from_retrieval: similarities below it make no pair


def add_flags(p):
    add_common_flags(p)
    group = p.add_argument_group('pairs (hloc\'s flag names)')
    group.add_argument('--descriptors', required=True,
                       help='The global-feats .h5 of the query images (written by --mode=extract or hloc), and of '
                            'the database unless --db_descriptors is given.')
    group.add_argument('--db_descriptors', default=None,
                       help='Global-feats .h5 of the database images (default: --descriptors).')
    group.add_argument('--num_matched', type=AT_LEAST_1, required=True,
                       help='Database images paired with each query.')
    group.add_argument('--output', required=True, help='The pairs file to write, one "query_name db_name" per line.')
    group.add_argument('--query_prefix', nargs='+', default=None,
                       help='Queries are the images of --descriptors whose name starts with one of these.')
    group.add_argument('--db_prefix', nargs='+', default=None,
                       help='Database images are those of --db_descriptors whose name starts with one of these.')
    group.add_argument('--query_list', default=None,
                       help='Text file of query names, one per line (first word; # comments); a glob pattern reads '
                            'every matching file. Default: all images of --descriptors.')
    group.add_argument('--db_list', default=None,
                       help='Text file of database names, as --query_list. Default: all images of --db_descriptors.')
    add_cache_path_flag(group)


def pairs(opt):
    return pairs_from_retrieval(opt.descriptors, opt.output, opt.num_matched, opt.db_descriptors, opt.query_prefix,
                                opt.db_prefix, opt.query_list, opt.db_list, opt.cachePath)


def pairs_from_retrieval(descriptors, output, num_matched, db_descriptors=None, query_prefix=None, db_prefix=None,
                         query_list=None, db_list=None, cache_path=None):
    """Writes hloc's pairs file `output` from global-feats files, as the mode's flags of the same names say; returns
    its path."""
    query_file, db_file = existing_files(descriptors, db_descriptors or descriptors)
    query_names = select_names(query_file, query_prefix, query_list, '--query_prefix', '--query_list')
    db_names = select_names(db_file, db_prefix, db_list, '--db_prefix', '--db_list')
    if num_matched > len(db_names):
        raise UserError(f'--num_matched {num_matched} is larger than the database: {db_file} holds '
                        f'{len(db_names)} database images (after --db_prefix/--db_list).')
    dim = descriptor_dim(db_file, db_names[0])
    if descriptor_dim(query_file, query_names[0]) != dim:
        raise UserError(f'{query_file} holds {descriptor_dim(query_file, query_names[0])}-D descriptors but '
                        f'{db_file} holds {dim}-D ones: both must come from the same model.')
    logging.info('Pairing %d queries of %s with their %d best of %d database images of %s', len(query_names),
                 query_file, num_matched, len(db_names), db_file)
    with cache_folder(cache_path) as folder:
        query_desc = read_descriptors(query_file, query_names, dim, os.path.join(folder, 'queries.npy'))
        db_desc = read_descriptors(db_file, db_names, dim, os.path.join(folder, 'database.npy'))
        query_ids, db_ids = name_ids(query_names, db_names)
        _, found = top_k_by_dot(query_desc, db_desc, num_matched, query_ids, db_ids, min_score=MIN_SCORE)
    count = write_pairs(output, query_names, db_names, found)
    logging.info('====> Wrote %d pairs to %s', count, output)
    return output


def existing_files(*paths):
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f'Descriptor file {path} does not exist: give a global-feats .h5 written by '
                            f'--mode=extract (or hloc).')
    return paths


def select_names(path, prefixes, list_pattern, prefix_flag, list_flag):
    """Names of the images of `path`, as hloc chooses them: those starting with a prefix, else those of the list
    files, else all."""
    if prefixes:
        names = [name for name in h5_names(path) if name.startswith(tuple(prefixes))]
        if not names:
            raise UserError(f'No image of {path} has a name starting with {prefix_flag} {" ".join(prefixes)}.')
        return names
    if list_pattern:
        return read_name_lists(list_pattern, list_flag)
    names = h5_names(path)
    if not names:
        raise UserError(f'{path} holds no images: it is not a global-feats file written by --mode=extract or hloc.')
    return names


def read_name_lists(pattern, flag):
    """Image names from the list files matching `pattern` (a path or a glob, as hloc's parse_image_lists): the
    first word of each line that is not empty or a # comment."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise UserError(f'{flag} {pattern}: no such file.')
    names = []
    for path in files:
        with open(path) as f:
            names += [line.split()[0] for line in f if line.strip() and not line.lstrip().startswith('#')]
    if not names:
        raise UserError(f'{flag} {pattern}: the list holds no image names.')
    return names


def name_ids(query_names, db_names):
    """Integer ids of the names on both sides: equal ids mark the same image (a self-match, which hloc excludes)."""
    ids = {name: i for i, name in enumerate(dict.fromkeys(query_names + db_names))}
    return np.array([ids[n] for n in query_names]), np.array([ids[n] for n in db_names])


def write_pairs(path, query_names, db_names, found):
    """One "query db" line per pair, each query's pairs together, best first, no newline after the last (as hloc);
    written line by line (commons.atomic_write). Returns the number of pairs."""
    count = [0]

    def write(f):
        separator = ''
        for query, row in zip(query_names, found):
            for db_index in row[row >= 0]:
                f.write(f'{separator}{query} {db_names[db_index]}')
                count[0], separator = count[0] + 1, '\n'
    atomic_write(path, write, mode='w')
    return count[0]
