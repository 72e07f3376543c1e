"""The protocol's numbers, pinned: every default of the cluster, train, test, prune and quantize modes as a user gets
it (each mode's parser, as main.py builds it, parsing a command line), the authors' recipe, Patch-NetVLAD's configs
and the evaluation constants, against tables written here from the references; then the behaviour at each
threshold (25 m, 10 m, the authors' 1 m floor, the triplet margin under both losses, the lr schedule), with the
expected outcome computed in the test.

References: the PyTorch port's main.py and pittsburgh.py (Nanne/pytorch-NetVlad), the authors' trainWeakly.m,
dbBase.m and demo.m (Relja/netvlad), the paper (Arandjelovic et al., CVPR 2016), Patch-NetVLAD's
configs/{performance,speed,storage}.ini (QVPR/Patch-NetVLAD), deep-visual-geo-localization-benchmark's folder-format
thresholds, and the project's own documented choices (docs/compression.md, docs/datasets.md)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io
import torch

from netvlad_toolkit import cli
from netvlad_toolkit.datasets import pittsburgh
from netvlad_toolkit.datasets.datasets import load_dataset, with_positive_floor
from netvlad_toolkit.modes import cluster, prune, quantize
from netvlad_toolkit.search import patch_netvlad, retrieval
from netvlad_toolkit.training import training
from netvlad_toolkit.utils.commons import UserError
from test_datasets import write_msls_side

# ---------------------------------------------------------------------------------------------- the tables

COMMON = dict(
    mode=None,               # filled in per mode
    runsPath='.',            # the port's is a path of its authors' machine; runs beside the data (SPEC 1)
    nGPU=1,                  # port main.py
    nocuda=False,            # port main.py
    seed=123,                # port main.py
)
DATASET = dict(
    dataset='pittsburgh',    # port main.py
    dataPath=None,           # resolved to '.' (SPEC 2: the current folder)
    imagesPath=None,
    positive_dist_threshold=25,          # a correct match lies within 25 m (paper, posDistThr, DVGL)
    train_positives_dist_threshold=10,   # training positives within 10 m (nonTrivPosDistSqThr 100, DVGL)
    panorama_suppression='auto',         # Tokyo 24/7 only (dbTokyo247.m)
    resize=None,                         # full size, as the port and the authors
    synth_db=300, synth_queries=150, synth_imsize='120x160',  # the built-in synthetic set (docs/datasets.md)
)
NETWORK = dict(
    arch=None, pooling=None, num_clusters=None,  # resolved to vgg16, netvlad, 64 (port main.py)
    vladv2=False, fromscratch=False,             # port main.py
)
RUN = dict(resume='', ckpt='latest', unsafe_load=False)  # port main.py: --resume '', --ckpt latest
EXTRACTION = dict(threads=8, cacheBatchSize=24, precision='fp32')  # port main.py: threads 8, cacheBatchSize 24
SEARCH = dict(index='flat', compare_exact=False, cachePath=None, desc_dtype='float32')  # exact L2 search (SPEC 5)
TRAINING = dict(
    batchSize=4,             # port main.py; trainWeakly.m batchSize 4
    cacheRefreshRate=1000,   # port main.py; trainWeakly.m compFeatsFrequency 1000
    trunk_cache='auto', trunk_cache_dtype='auto',  # float32 when it fits: results equal those without it
    optim='SGD',             # port main.py
    lr=0.0001,               # port main.py; trainWeakly.m learningRate 1e-4
    lrStep=5,                # port main.py; trainWeakly.m lrDownFreq 5
    lrGamma=0.5,             # port main.py; trainWeakly.m lrDownFactor 2
    weightDecay=0.001,       # port main.py; trainWeakly.m weightDecay 1e-3
    momentum=0.9,            # port main.py; trainWeakly.m momentum 0.9
    margin=0.1,              # port main.py (sqrt(0.1) on plain distances); paper and trainWeakly.m: 0.1 on squared
    loss='reference',        # the port's loss by default (SPEC 6)
    nNeg=10,                 # port pittsburgh.py nNeg; trainWeakly.m nNegCap 10
    nNegSample=1000,         # port pittsburgh.py nNegSample; trainWeakly.m nNegChoice 1000
    evalEvery=1,             # port main.py; trainWeakly.m epochTestFrequency 1
    patience=10,             # port main.py
    recipe='reference', batch_queries='violating', min_positive_dist=0.0, neg_memory='violating',
    nNegCache=10,            # trainWeakly.m nNegCache 10 (read with --neg_memory nearest)
    refresh_doubling='off', val_queries=0, best_epoch='recall5', logged_loss='batch',  # the port's rules
)
TRAIN_ONLY = dict(nEpochs=30, savePath=None, backPropToLayer=None)  # port main.py nEpochs 30; trainWeakly.m nEpoch 30
TEST_ONLY = dict(
    split='val',             # port main.py
    latency=False, latency_size=(480, 640),  # Pittsburgh's 640x480 images
    rerank='none', rerank_top=100,           # Patch-NetVLAD: the largest of n_values_all (1,5,10,20,50,100)
    rerank_config='performance', patch_sizes=None, strides=None, patchWeights2Use=None, num_pcs=None, matcher=None,
    output_features_dir=None, database_folder=None, queries_folder=None, save_predictions=0, descriptors=None,
    database_run=None,       # symmetric search: the queries and the database encoded by the same run
)
COMPRESSION = dict(split='val', backPropToLayer=None, latency_size=(480, 640), overwrite=False)
PRUNE_ONLY = dict(pruning_type='structured', pruning_amount=0.2,  # the seed commands' 20 %
                  pruning_layers='all', pruning_criterion='activation', pruning_scope='global',
                  finetune_epochs=2)  # docs/compression.md
QUANTIZE_ONLY = dict(quantization_type='static', calib_images=256, qat_epochs=1)  # docs/compression.md

MODE_DEFAULTS = {
    'cluster': {**COMMON, **DATASET, **NETWORK, **EXTRACTION},
    'train': {**COMMON, **DATASET, **NETWORK, **RUN, **EXTRACTION, **SEARCH, **TRAINING, **TRAIN_ONLY},
    'test': {**COMMON, **DATASET, **NETWORK, **RUN, **EXTRACTION, **SEARCH, **TEST_ONLY},
    'prune': {**COMMON, **DATASET, **NETWORK, **RUN, **EXTRACTION, **SEARCH, **TRAINING, **COMPRESSION,
              **PRUNE_ONLY},
    'quantize': {**COMMON, **DATASET, **NETWORK, **RUN, **EXTRACTION, **SEARCH, **TRAINING, **COMPRESSION,
                 **QUANTIZE_ONLY},
}
REQUIRED = {'prune': ['--resume=RUN'], 'quantize': ['--resume=RUN']}  # flags a mode cannot run without
RESOLVED = dict(arch='vgg16', pooling='netvlad', num_clusters=64, dataPath='.')  # port main.py; SPEC 2

# trainWeakly.m's opts and demo.m's calls; the loss and the rules are the paper's and trainWeakly.m's.
AUTHORS = dict(
    optim='SGD', lr=0.0001, momentum=0.9, weightDecay=0.001,  # learningRate, momentum, weightDecay
    lrStep=5, lrGamma=0.5,                                    # lrDownFreq 5, lrDownFactor 2
    batchSize=4, nNegSample=1000, nNeg=10, nNegCache=10,      # batchSize, nNegChoice, nNegCap, nNegCache
    margin=0.1, loss='paper',                                 # margin 0.1 on squared distances
    nEpochs=30, cacheRefreshRate=1000, evalEvery=1,           # nEpoch, compFeatsFrequency, epochTestFrequency
    patience=0,                                               # no early stopping
    batch_queries='all', min_positive_dist=1.0,               # floor(nQ/4) batches; dbBase.m dSq > 1
    neg_memory='nearest', refresh_doubling='on',              # nNegCache nearest; compFeatsFrequency x lrDownFactor
    val_queries=1000,                                         # nTestSample 1000
    best_epoch='authors', logged_loss='queries',              # getBestEpoch.m; the per-query loss it prints
)
AUTHORS_FIRST_LAYER = {'alexnet': 'conv2', 'vgg16': 'conv5_1'}  # demo.m backPropToLayer

# Patch-NetVLAD's configs/*.ini: patch_sizes, strides, patchweights2use, num_pcs, matcher; n_values_all up to 100.
PATCH_NETVLAD = {
    'performance': ((2, 5, 8), (1, 1, 1), (0.45, 0.15, 0.4), 4096, 'RANSAC'),
    'speed': ((5,), (1,), (1.0,), 512, 'spatialApproximator'),
    'storage': ((5,), (1,), (1.0,), 128, 'spatialApproximator'),
}
RECALL_NS = [1, 5, 10, 20]  # port main.py n_values; SPEC 5
CLUSTERING = dict(NUM_DESCRIPTORS=50000, DESCRIPTORS_PER_IMAGE=100, KMEANS_ITERATIONS=100)  # SPEC 3
CUTOUTS_PER_PANORAMA = 12  # dbTokyo247.m
TOKYO_TM_FLOOR = 1.0       # dbTokyoTimeMachine.m: dSq > 1
TIME_EXCLUSION_FACTOR = 10  # dbTokyoTimeMachine.m: 10 x N retrieved on val
QAT_LR = 0.1                # docs/compression.md: QAT fine-tunes at a tenth of --lr
CRITERION_IMAGES = 64       # docs/compression.md: activations of 64 training-database images
CHANNEL_MULTIPLE = 8        # docs/compression.md: kept widths are multiples of 8
RANSAC_STRIDES = 1.5        # Patch-NetVLAD's patch_matcher.py: ransacReprojThreshold=16*stride*1.5 pixels (VGG16)
RANSAC_ITERATIONS = 2000    # cv2.findHomography's default maxIters, which Patch-NetVLAD keeps
APPROXIMATE = dict(IVF_NPROBE=32, PQ_MAX_BYTES=64, HNSW_M=32, HNSW_EF_SEARCH=128)  # docs/scale.md


def parsed(mode, *flags):
    """What a user gets: the mode's parser, as main.py builds it, on a command line."""
    return vars(cli.mode_parser(mode).parse_args([f'--mode={mode}', *REQUIRED.get(mode, []), *flags]))


@pytest.mark.parametrize('mode', list(MODE_DEFAULTS))
def test_every_default_of_a_mode_is_the_references(mode):
    expected = dict(MODE_DEFAULTS[mode], mode=mode)
    if mode in REQUIRED:
        expected['resume'] = 'RUN'
    got = parsed(mode)
    assert sorted(got) == sorted(expected), 'a flag was added or removed: give it a row in the table'
    wrong = {flag: (got[flag], value) for flag, value in expected.items() if got[flag] != value}
    assert not wrong, f'(parsed, reference): {wrong}'


@pytest.mark.parametrize('mode', list(MODE_DEFAULTS))
def test_the_defaults_that_depend_on_other_flags_resolve_to_the_references(mode, tmp_path):
    opt = cli.parse_options([f'--mode={mode}', f'--runsPath={tmp_path}', *REQUIRED.get(mode, [])])
    for flag, value in RESOLVED.items():
        assert getattr(opt, flag) == value, flag
    if mode == 'train':  # SPEC 1: <arch>_netvlad_checkpoint/<arch>_netvlad_checkpoint under the runs folder
        assert opt.savePath == str(tmp_path / 'vgg16_netvlad_checkpoint' / 'vgg16_netvlad_checkpoint')


SEED_COMMANDS = [  # SPEC 1, verbatim (the elided --resume of the compression commands filled in)
    ('--mode=cluster --arch=alexnet --nGPU 1', {}),
    ('--mode=train --arch=alexnet --nGPU 1 --optim ADAM --lr 0.0001', dict(optim='ADAM', lr=0.0001)),
    ('--mode=test --arch=alexnet --split=test --nGPU 1 --resume=alexnet_netvlad_checkpoint/alexnet_netvlad_checkpoint/',
     dict(split='test')),
    ('--mode=prune --arch=alexnet --pruning_type=structured --pruning_amount=0.2 --nGPU 1 --resume=R',
     dict(pruning_type='structured', pruning_amount=0.2)),
    ('--mode=prune --arch=alexnet --pruning_type=unstructured --pruning_amount=0.2 --nGPU 1 --resume=R',
     dict(pruning_type='unstructured', pruning_amount=0.2)),
    ('--mode=quantize --arch=alexnet --quantization_type=static --nGPU 1 --resume=R', dict(quantization_type='static')),
    ('--mode=quantize --arch=alexnet --quantization_type=qat --nGPU 1 --resume=R', dict(quantization_type='qat')),
    ('--mode=cluster --arch=vgg16 --nGPU 1 --cacheBatchSize=4', dict(cacheBatchSize=4)),
    ('--mode=test --arch=vgg16 --split=test --nGPU 1 --resume=vgg16_netvlad_checkpoint/vgg16_netvlad_checkpoint/',
     dict(split='test')),
]


@pytest.mark.parametrize('command, given', SEED_COMMANDS)
def test_a_seed_command_reads_its_flags_and_the_reference_defaults(command, given, tmp_path):
    argv = command.split() + [f'--runsPath={tmp_path}']
    opt = vars(cli.parse_options(argv))
    mode = opt['mode']
    expected = {**MODE_DEFAULTS[mode], **RESOLVED, **given, 'nGPU': 1, 'arch': opt['arch']}
    for flag, value in expected.items():
        if flag not in ('mode', 'resume', 'runsPath', 'savePath'):
            assert opt[flag] == value, (command, flag)


ACCEPTED_EDGES = [  # values the references give a meaning to
    ('train', '--patience=0'),          # port main.py: 0 is off (and the authors' recipe)
    ('train', '--cacheRefreshRate=0'),  # once per epoch
    ('train', '--nGPU=0'),              # the CPU
    ('train', '--val_queries=0'),       # every val query (the port)
    ('train', '--weightDecay=0'), ('train', '--momentum=0'), ('train', '--min_positive_dist=0'),
    ('train', '--batchSize=1'), ('train', '--nNeg=1'), ('train', '--evalEvery=1'), ('train', '--lrGamma=1'),
    ('prune', '--pruning_amount=0.99'), ('prune', '--finetune_epochs=0'), ('quantize', '--qat_epochs=1'),
]
REJECTED_EDGES = [('train', '--lr=0'), ('train', '--margin=0'), ('train', '--batchSize=0'), ('train', '--momentum=1'),
                  ('train', '--lrGamma=0'), ('prune', '--pruning_amount=0'), ('prune', '--pruning_amount=1'),
                  ('quantize', '--qat_epochs=0')]


@pytest.mark.parametrize('mode, flag', ACCEPTED_EDGES)
def test_a_flag_accepts_the_edge_values_the_references_use(mode, flag, tmp_path):
    opt = cli.parse_options([f'--mode={mode}', *REQUIRED.get(mode, []), flag, f'--runsPath={tmp_path}'])
    name, value = flag[2:].split('=')
    assert getattr(opt, name) == float(value)


@pytest.mark.parametrize('mode, flag', REJECTED_EDGES)
def test_a_flag_refuses_a_value_outside_its_range(mode, flag, tmp_path):
    with pytest.raises(UserError, match=flag.split('=')[0]):
        cli.parse_options([f'--mode={mode}', *REQUIRED.get(mode, []), flag, f'--runsPath={tmp_path}'])


def test_adam_gets_no_weight_decay_and_sgd_the_references():
    """The port gives Adam the lr only; SGD lr 1e-4, momentum 0.9, weight decay 1e-3 (SPEC 6)."""
    layer = torch.nn.Linear(2, 2)
    adam = cli.parse_options(['--mode=train', '--arch=alexnet', '--nGPU', '1', '--optim', 'ADAM', '--lr', '0.0001'])
    optimizer, scheduler = training.make_optimizer(layer, adam)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]['weight_decay'] == 0 and optimizer.param_groups[0]['lr'] == 0.0001
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]['lr'] == 0.0001  # the port steps no schedule for Adam
    sgd, _ = training.make_optimizer(layer, cli.parse_options(['--mode=train']))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group['lr'], group['momentum'], group['weight_decay']) == (0.0001, 0.9, 0.001)


@pytest.mark.parametrize('arch', ['alexnet', 'vgg16'])
def test_the_authors_recipe_is_trainweakly(arch):
    opt = cli.parse_options(['--mode=train', f'--arch={arch}', '--recipe=authors'])
    training.apply_recipe(opt)
    assert {flag: getattr(opt, flag) for flag in AUTHORS} == AUTHORS
    assert opt.backPropToLayer == AUTHORS_FIRST_LAYER[arch]
    assert set(training.AUTHORS_RECIPE) == set(AUTHORS), 'a rule of the recipe has no row in the table'


def test_the_patch_netvlad_configs_are_the_references():
    for name, (sizes, strides, weights, dim, matcher) in PATCH_NETVLAD.items():
        config = patch_netvlad.configured(name, matcher=matcher)
        assert (config.patch_sizes, config.strides, config.patch_weights, config.pca_dim) == \
            (sizes, strides, weights, dim), name
        assert config == patch_netvlad.configured(name), f'{name}: its matcher is not {matcher}'
        assert config.name == name and config.num_candidates == 100
        assert patch_netvlad.RERANK_CONFIGS[name] == config
    assert (patch_netvlad.RANSAC_THRESHOLD, patch_netvlad.RANSAC_HYPOTHESES) == (RANSAC_STRIDES, RANSAC_ITERATIONS)


def test_the_evaluation_and_clustering_constants_are_the_references():
    assert retrieval.RECALL_NS == RECALL_NS
    assert retrieval.CURVE_MAX_N == 25  # getBestEpoch.m's ties reach past Recall@20: the curve holds 1..25
    assert {name: getattr(cluster, name) for name in CLUSTERING} == CLUSTERING
    assert pittsburgh.CUTOUTS_PER_PANORAMA == CUTOUTS_PER_PANORAMA
    assert pittsburgh.TOKYO_TM_MIN_POSITIVE_DIST == TOKYO_TM_FLOOR
    assert retrieval.TIME_EXCLUSION_FACTOR == TIME_EXCLUSION_FACTOR
    assert training.TIE_TOLERANCE == 1e-6  # getBestEpoch.m
    assert quantize.QAT_LR_FACTOR == QAT_LR
    assert (prune.CRITERION_IMAGES, prune.CHANNEL_MULTIPLE) == (CRITERION_IMAGES, CHANNEL_MULTIPLE)
    assert {name: getattr(retrieval, name) for name in APPROXIMATE} == APPROXIMATE


# ---------------------------------------------------------------------------------------------- 25 m and 10 m

JUST = 0.01  # metres either side of a threshold


def distances_around(threshold):
    """East offsets of database images just inside and just outside `threshold` metres."""
    return np.array([threshold - JUST, threshold + JUST])


def recall_at_1(ground_truth, nearest):
    """Recall@1 through the evaluation's own search, with descriptors that rank database image `nearest` first."""
    num_db = ground_truth.numDb
    whole = np.full((num_db + 1, 2), 10.0, dtype=np.float32)
    whole[np.arange(num_db), 0] = np.arange(num_db)  # database descriptors far from each other
    whole[num_db] = whole[nearest] + 0.01              # the query: nearest to `nearest`
    opt = SimpleNamespace(cuda=False, index='flat')
    result = retrieval.search_and_recall(whole, num_db, ground_truth.positives(), opt, ground_truth)
    return result['recalls'][1]


def write_folder_split(root, split, offsets):
    """A folder-format split: one query at UTM (500000, 4000000), database images `offsets` metres east of it."""
    folder = root / 'images' / split
    (folder / 'database').mkdir(parents=True)
    (folder / 'queries').mkdir(parents=True)
    name = lambda east: f'@{east:.3f}@4000000.000@17@T@@@@@@@@@@@.jpg'
    (folder / 'queries' / name(500000.0)).write_bytes(b'')
    for offset in offsets:
        (folder / 'database' / name(500000.0 + offset)).write_bytes(b'')


def write_db_struct(root, name, offsets, pos_dist=25.0, non_trivial_sq=100.0):
    """A dbStruct file as the authors write them: one query, database images `offsets` metres east of it (their
    image files empty)."""
    names = lambda count, prefix: np.array([[f'{prefix}{i}.jpg'] for i in range(count)], dtype=object)
    (root / 'queries_real').mkdir(exist_ok=True)
    for i in range(len(offsets)):
        (root / f'db{i}.jpg').write_bytes(b'')
    (root / 'queries_real' / 'q0.jpg').write_bytes(b'')
    struct = dict(whichSet='test', dbImageFns=names(len(offsets), 'db'), utmDb=np.stack(
        [500000.0 + offsets, np.full(len(offsets), 4000000.0)]), qImageFns=names(1, 'q'),
        utmQ=np.array([[500000.0], [4000000.0]]), numImages=float(len(offsets)), numQueries=1.0,
        posDistThr=pos_dist, posDistSqThr=pos_dist ** 2, nonTrivPosDistSqThr=non_trivial_sq)
    (root / 'datasets').mkdir(exist_ok=True)
    scipy.io.savemat(root / 'datasets' / f'{name}.mat', {'dbStruct': struct})


def folder_split(tmp_path, mode, offsets, *flags):
    write_folder_split(tmp_path, 'test', offsets)
    opt = cli.parse_options([f'--mode={mode}', '--dataset=folder', f'--dataPath={tmp_path}',
                              f'--runsPath={tmp_path}', *flags])
    return load_dataset(opt, 'test', images=False).db_struct


def test_a_folder_database_image_counts_as_correct_within_25_m_only(tmp_path):
    truth = folder_split(tmp_path, 'test', distances_around(25.0))
    assert [list(p) for p in truth.positives()] == [[0]]
    assert (recall_at_1(truth, 0), recall_at_1(truth, 1)) == (1.0, 0.0)


def test_a_folder_training_positive_lies_within_10_m_and_the_authors_floor_beyond_1_m(tmp_path):
    offsets = np.concatenate([distances_around(1.0), distances_around(10.0)])
    truth = folder_split(tmp_path, 'train', offsets)
    assert [list(p) for p in truth.nontrivial_positives()] == [[0, 1, 2]]  # the port: no floor
    authors = cli.parse_options(['--mode=train', '--recipe=authors', '--arch=alexnet'])
    training.apply_recipe(authors)
    split = SimpleNamespace(db_struct=truth, split='train', resize=None)
    floored = with_positive_floor(split, authors.min_positive_dist).db_struct
    assert [list(p) for p in floored.nontrivial_positives()] == [[1, 2]]  # dbBase.m: 1 < d^2 <= 100
    assert [list(p) for p in floored.positives()] == [[0, 1, 2, 3]]  # what counts as correct stays


def test_a_dbstruct_database_image_counts_as_correct_within_its_posdistthr_only(tmp_path):
    write_db_struct(tmp_path, 'pitts30k_test', np.concatenate([distances_around(10.0), distances_around(25.0)]))
    opt = cli.parse_options(['--mode=test', f'--dataPath={tmp_path}', f'--runsPath={tmp_path}'])
    truth = load_dataset(opt, 'test', images=False).db_struct
    assert [list(p) for p in truth.positives()] == [[0, 1, 2]]
    assert [list(p) for p in truth.nontrivial_positives()] == [[0]]
    assert (recall_at_1(truth, 2), recall_at_1(truth, 3)) == (1.0, 0.0)


def test_an_msls_database_image_is_correct_within_25_m_and_a_training_positive_within_10_m(tmp_path):
    offsets = np.concatenate([distances_around(10.0), distances_around(25.0)])
    side = tmp_path / 'train_val' / 'trondheim'
    write_msls_side(side / 'database', [f'db{i}' for i in range(4)],
                    [(500000.0 + offset, 4000000.0) for offset in offsets], [False] * 4)
    write_msls_side(side / 'query', ['q0'], [(500000.0, 4000000.0)], [False])
    opt = cli.parse_options(['--mode=train', '--dataset=msls', f'--dataPath={tmp_path}', f'--runsPath={tmp_path}'])
    truth = load_dataset(opt, 'train', images=False).db_struct
    assert [list(p) for p in truth.positives()] == [[0, 1, 2]]
    assert [list(p) for p in truth.nontrivial_positives()] == [[0]]


def test_training_reads_the_train_split_and_validates_on_every_val_query(tmp_path):
    """Outside torchrun the process validates (the port: every val query; the authors: 1000 of them)."""
    write_db_struct(tmp_path, 'pitts30k_train', distances_around(10.0))
    write_db_struct(tmp_path, 'pitts30k_val', distances_around(25.0))
    opt = cli.parse_options(['--mode=train', f'--dataPath={tmp_path}', f'--runsPath={tmp_path}'])
    data, val_set = training.training_splits(opt)
    assert list(data.queries) == [0] and [list(p) for p in data.nontrivial] == [[0]]
    assert val_set is not None and val_set.split == 'val' and [list(p) for p in val_set.positives()] == [[0]]


def test_the_synthetic_dataset_has_the_pittsburgh_thresholds_and_its_documented_streets(tmp_path):
    """docs/datasets.md: streets 1 km apart, a database view every 5 m, the train split twice as large; and the
    Pittsburgh thresholds in dbStruct fields 7, 8 and 9 (posDistThr 25, posDistSqThr 625, nonTrivPosDistSqThr 100).
    61 database images need two streets of at most 60 views each."""
    opt = cli.parse_options(['--mode=synth', f'--dataPath={tmp_path}', '--synth_db=61', '--synth_queries=2',
                              '--synth_imsize=32x32'])
    cli.run(opt)
    for split, num_db in (('train', 122), ('val', 61), ('test', 61)):
        fields = scipy.io.loadmat(tmp_path / 'datasets' / f'pitts30k_{split}.mat')['dbStruct'][0, 0]
        assert [float(fields[i].ravel()[0]) for i in (7, 8, 9)] == [25.0, 625.0, 100.0]
        utm_db = fields[2].T
        assert len(utm_db) == num_db
        steps = np.linalg.norm(np.diff(utm_db, axis=0), axis=1)
        streets = 1 + int((steps > 100).sum())
        assert streets == math.ceil(num_db / 60), split
        assert steps[steps <= 100] == pytest.approx(5.0)  # a view every 5 m along a street
        starts = utm_db[np.r_[0, np.flatnonzero(steps > 100) + 1]]
        assert np.abs(np.diff(starts, axis=0)[:, 1]) == pytest.approx(1000.0, abs=50)  # streets 1 km apart


# ---------------------------------------------------------------------------------------------- the margin

EPS = 1e-3


def margin_cache(best_positive, negatives):
    """Descriptors on a line: the query at 0, a positive at `best_positive`, negatives at `negatives` (database rows
    first, then the query)."""
    rows = [best_positive, *negatives, 0.0]
    return torch.tensor([[value, 0.0] for value in rows], dtype=torch.float32)


@pytest.mark.parametrize('loss', ['reference', 'paper'])
def test_a_negative_is_mined_just_inside_the_margin_and_not_just_outside(loss):
    opt = cli.parse_options(['--mode=train', f'--loss={loss}'])
    d_pos, margin = 0.5, 0.1
    edge = d_pos + math.sqrt(margin) if loss == 'reference' else math.sqrt(d_pos ** 2 + margin)
    negatives = [edge - EPS, edge + EPS]
    cache = margin_cache(d_pos, negatives)
    mined = training.mine_triplets(cache, torch.tensor([3]), 3, torch.tensor([[0]]), torch.tensor([[1, 2]]),
                                   opt.margin, opt.nNeg, opt.loss)
    assert mined.negatives[0].tolist()[:2] == [1, -1] and bool(mined.usable[0])
    descriptors = torch.tensor([[0.0, 0.0], [d_pos, 0.0], *[[n, 0.0] for n in negatives]])
    terms = training.triplet_terms(descriptors, [2], opt.margin, opt.loss)
    if loss == 'reference':  # TripletMarginLoss(margin=sqrt(0.1)) on plain distances
        expected = [max(0.0, d_pos - n + math.sqrt(margin)) for n in negatives]
    else:  # the paper: max(0, d(q,p)^2 + 0.1 - d(q,n)^2)
        expected = [max(0.0, d_pos ** 2 + margin - n ** 2) for n in negatives]
    assert terms.tolist() == pytest.approx(expected, abs=1e-5)
    assert terms[0] > 0 and terms[1] == 0


# ---------------------------------------------------------------------------------------------- the lr schedule

def test_the_lr_halves_after_5_epochs_and_again_after_10():
    """trainWeakly.m: lr / lrDownFactor before every epoch e > 1 with rem(e, lrDownFreq) == 1, so epochs 1-5 train
    at 1e-4, 6-10 at 5e-5, 11 at 2.5e-5; fit steps the scheduler after each epoch."""
    opt = cli.parse_options(['--mode=train'])
    optimizer, scheduler = training.make_optimizer(torch.nn.Linear(2, 2), opt)
    rate = {}
    for epoch in range(1, 12):
        rate[epoch] = optimizer.param_groups[0]['lr']
        optimizer.step()
        scheduler.step()
    expected, lr = {}, 0.0001
    for epoch in range(1, 12):
        if epoch != 1 and epoch % 5 == 1:
            lr /= 2
        expected[epoch] = lr
    assert rate == pytest.approx(expected, rel=1e-12)
    assert (rate[5], rate[6]) == pytest.approx((0.0001, 0.00005), rel=1e-12)
    assert [training.lr_drops_before(e, opt) for e in (5, 6, 10, 11)] == [0, 1, 1, 2]


def test_a_query_is_mined_with_one_of_its_own_positives():
    """Queries with fewer positives than others in their chunk: the padding of their positives' rows is never taken
    for a database image (database image 0 lies on query 0 but is not its positive)."""
    num_db, num_q = 6, 2
    cache = torch.tensor([[0.0, 0.0], [0.3, 0.0], [5.0, 5.0], [5.2, 5.0], [0.5, 0.1], [5.3, 5.1], [0.0, 0.0],
                          [5.0, 5.05]])  # database rows, then the two queries
    nontrivial = [np.array([1]), np.array([2, 3])]
    data = SimpleNamespace(num_db=num_db, nontrivial=nontrivial, potential=[np.array([1]), np.array([2, 3])],
                           refresh_cache=lambda *args: cache)
    opt = cli.parse_options(['--mode=train'])
    memory = np.full((num_q, training.memory_width(opt)), -1, dtype=np.int64)
    triplets = training.chunk_triplets(data, None, None, np.arange(num_q), memory, opt, None,
                                       np.random.default_rng(0), 0, 1)
    positives = {query - num_db: positive for query, positive, _ in triplets}
    assert positives[0] == 1 and positives[1] in (2, 3)
