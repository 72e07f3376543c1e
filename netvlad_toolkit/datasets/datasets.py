"""The one dataset interface every mode reads: a split's images (database first, then queries) and its ground truth.

`load_dataset(opt, split)` picks the reader of `--dataset` (pittsburgh.py for dbStruct files, Pittsburgh, Tokyo
24/7 and Tokyo Time Machine; folder_dataset.py for the @UTM folder layout; msls.py for Mapillary SLS). Each reader's
`read_split(opt, split)` returns the keyword arguments of `GroundTruth`, so the modes never ask which format they
read.
"""
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from torch.utils.data import Subset

from netvlad_toolkit.datasets import folder_dataset, msls, pittsburgh
from netvlad_toolkit.datasets.images import ImageList, check_images_exist
from netvlad_toolkit.utils.commons import UserError

READERS = {'pittsburgh': pittsburgh, 'synthetic': pittsburgh, 'tokyoTM': pittsburgh, 'folder': folder_dataset,
           'msls': msls}


@dataclass
class GroundTruth:
    """A split's database and queries, their positions, and the rules its retrieval is scored by.

    The attributes the modes read keep the dbStruct's names (utmDb, posDistThr, ..., numDb, numQ); protocol rules
    that only some datasets have default to "not used".
    """
    name: str                          # what the logs call it, e.g. 'pitts30k_test.mat'
    db_paths: list                     # image paths, database
    query_paths: list                  # and queries
    utmDb: np.ndarray                  # [numDb, 2] easting, northing (metres)
    utmQ: np.ndarray                   # [numQ, 2]
    posDistThr: float                  # metres: a database image this close is a correct match, never a negative
    nonTrivPosDistSqThr: float         # squared metres: training positives lie this close
    images_hint: str = ''              # where the images are expected, for the missing-image error
    db_panorama: np.ndarray = None     # [numDb] panorama ids: only the best image of each panorama is ranked
    db_time: np.ndarray = None         # [numDb] capture times (Tokyo Time Machine)
    q_time: np.ndarray = None          # [numQ]
    min_train_pos_dist: float = None   # metres: training positives lie farther than this (TokyoTM: 1)
    train_pos_other_time: bool = False  # training positives come from another time than the query (TokyoTM)
    exclude_same_time: bool = False    # database images of the query's time leave its ranking (TokyoTM val)
    only_queries_with_positives: bool = False  # queries without a positive are not scored (MSLS)
    query_sizes_vary: bool = False     # queries come in different sizes (Tokyo 24/7): extracted one at a time

    def __post_init__(self):
        if not self.db_paths or not self.query_paths:
            raise UserError(f'{self.name} has {len(self.db_paths)} database images and {len(self.query_paths)} '
                            f'queries: a split needs at least one of each.')
        for side, utm, count in (('database', self.utmDb, len(self.db_paths)), ('query', self.utmQ,
                                                                             len(self.query_paths))):
            utm = np.asarray(utm)
            if utm.shape != (count, 2) or not np.issubdtype(utm.dtype, np.number):
                raise UserError(f'{self.name}: the {side} positions have shape {utm.shape}; expected {count} rows '
                                f'of (easting, northing) numbers, one per {side} image.')
            if not np.isfinite(utm).all():
                bad = int(np.flatnonzero(~np.isfinite(utm).all(axis=1))[0])
                raise UserError(f'{self.name}: the position of {side} image {bad} is not finite ({utm[bad].tolist()}); '
                                f'every image needs a real easting and northing in metres.')

    @property
    def numDb(self):
        return len(self.db_paths)

    @property
    def numQ(self):
        return len(self.query_paths)

    def positives(self):
        """For each query, the sorted database indices within posDistThr."""
        return positives_within(self, self.posDistThr)

    def nontrivial_positives(self):
        """For each query, its training positives: within sqrt(nonTrivPosDistSqThr), and the protocol's rules."""
        positives = positives_within(self, np.sqrt(self.nonTrivPosDistSqThr))
        if self.min_train_pos_dist is None and not self.train_pos_other_time:
            return positives
        return [p[self.keeps_as_training_positive(query, p)] for query, p in enumerate(positives)]

    def keeps_as_training_positive(self, query, candidates):
        keep = np.ones(len(candidates), dtype=bool)
        if self.min_train_pos_dist is not None:
            keep &= np.linalg.norm(self.utmDb[candidates] - self.utmQ[query], axis=1) > self.min_train_pos_dist
        if self.train_pos_other_time:
            keep &= self.db_time[candidates] != self.q_time[query]
        return keep

    def kept_in_ranking(self, predictions):
        """[numQ, k] mask of the ranked database indices `predictions` (-1: none) that a query's ranking keeps."""
        if not self.exclude_same_time:
            return predictions >= 0
        return (predictions >= 0) & (self.db_time[predictions] != self.q_time[:, None])


def positives_within(ground_truth, radius):
    """For each query, the sorted indices of the database images within `radius` metres."""
    tree = cKDTree(ground_truth.utmDb)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in tree.query_ball_point(ground_truth.utmQ, r=radius)]


class SplitImages(ImageList):
    """All images of a split, database first then queries, with the split's ground truth as `db_struct`."""

    def __init__(self, ground_truth, split, resize=None):
        super().__init__(ground_truth.db_paths + ground_truth.query_paths, resize,
                         sizes_vary_from=ground_truth.numDb if ground_truth.query_sizes_vary else None)
        self.db_struct = ground_truth
        self.split = split

    def positives(self):
        return self.db_struct.positives()

    def nontrivial_positives(self):
        return self.db_struct.nontrivial_positives()


def load_dataset(opt, split, images=True):
    """The split `split` of the dataset --dataset in --dataPath, as a whole-split image list.

    In test mode --database_folder/--queries_folder replace the split by two folders of the folder format.
    images=False: only the ground truth is needed (e.g. searching descriptors computed elsewhere), so the image
    files are not checked.
    """
    reader = folder_dataset if folder_dataset.two_folders(opt) else READERS[opt.dataset]
    ground_truth = GroundTruth(**reader.read_split(opt, split))
    if images:
        check_images_exist(ground_truth.db_paths + ground_truth.query_paths, ground_truth.images_hint)
    return SplitImages(ground_truth, split, getattr(opt, 'resize', None))


def query_sample(split_images, count, seed):
    """The split with `count` of its queries drawn at random (seeded), all of them when it has no more: the
    authors validate on 1000 random val queries (trainWeakly.m's nTestSample)."""
    truth = split_images.db_struct
    if count >= truth.numQ:
        return split_images
    kept = np.sort(np.random.default_rng(seed).choice(truth.numQ, count, replace=False))
    sampled = dataclasses.replace(truth, query_paths=[truth.query_paths[q] for q in kept], utmQ=truth.utmQ[kept],
                                  q_time=None if truth.q_time is None else truth.q_time[kept])
    return SplitImages(sampled, split_images.split, split_images.resize)


def with_positive_floor(split_images, metres):
    """The split whose training positives lie farther than `metres` from their query, as well as its own rules
    (the authors' dbBase.m keeps only 1 m^2 < d^2 for every dataset)."""
    truth = split_images.db_struct
    floor = max(metres, truth.min_train_pos_dist or 0.0)
    return SplitImages(dataclasses.replace(truth, min_train_pos_dist=floor), split_images.split, split_images.resize)


def training_database_sample(opt, count, purpose):
    """`count` random training-database images (seeded by --seed), never the evaluated split: what int8 activation
    ranges are calibrated on, and what pruning ranks channels by. `purpose` says in errors what they are for."""
    try:
        train_set = load_dataset(opt, 'train')
    except UserError as error:
        raise UserError(f'{purpose} on {count} training-database images, never on the evaluated split, and the '
                        f'training split cannot be read. {error}') from None
    num_db = train_set.db_struct.numDb
    if num_db == 0:
        raise UserError(f'The training split of {opt.dataPath} has no database images: {purpose} on them.')
    if count > num_db:
        logging.info('%s on %d training-database images: the training database has only %d; using all of them.',
                     purpose, count, num_db)
    chosen = np.sort(np.random.default_rng(opt.seed).choice(num_db, min(count, num_db), replace=False))
    return Subset(train_set, chosen.tolist())
