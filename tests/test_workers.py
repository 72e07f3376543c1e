"""DataLoader workers: descriptors extracted through workers started by forkserver and by spawn equal those computed
here without the toolkit; the loaders never fork this process (no fork-from-threads DeprecationWarning on Python
3.12+), whatever the interpreter's default; a set gets as many workers as its estimated loading work repays; the
forkserver's preload list."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from netvlad_toolkit.datasets import images

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
# Run in a fresh interpreter: sets the interpreter's start method before the toolkit is imported (argv: method,
# image folder, output .npy), keeps a Python thread and torch's CPU threads running, then extracts descriptors of the
# folder's images through retrieval.extract_descriptors with two workers. Prints the start method and the worker
# count of the loader it used, and the DeprecationWarnings raised meanwhile: recorded, not turned into errors, since
# os.fork swallows an error raised by its own warning (Python 3.12+: "This process is multi-threaded, use of fork()
# may lead to deadlocks in the child").
EXTRACTION = '''
import json, multiprocessing, sys, threading, warnings
if __name__ == '__main__':
    method, folder, output = sys.argv[1:]
    multiprocessing.set_start_method(method)
    import numpy as np
    import torch
    from netvlad_toolkit.datasets import gpu_decode, images
    from netvlad_toolkit.search import retrieval

    class ChannelMeans(torch.nn.Module):
        output_dim = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    used = []

    def recorded(*args, **kwargs):
        used.append(images_loader(*args, **kwargs))
        return used[-1]
    images_loader, gpu_decode.image_loader = gpu_decode.image_loader, recorded
    images.WORKER_START_SECONDS = dict.fromkeys(images.WORKER_START_SECONDS, 0)  # workers even for a few images
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)  # torch's CPU thread pool started
    paths = sorted(str(p) for p in __import__('pathlib').Path(folder).glob('*.png'))
    opt = __import__('argparse').Namespace(threads=2, cuda=False, cacheBatchSize=2, precision='fp32')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', DeprecationWarning)
        descriptors = retrieval.extract_descriptors(ChannelMeans(), images.ImageList(paths), opt, torch.device('cpu'))
    stop.set()
    np.save(output, descriptors)
    loader = used[0]
    print(json.dumps(dict(method=loader.multiprocessing_context.get_start_method(), workers=loader.num_workers,
                          deprecations=[str(w.message) for w in caught if w.category is DeprecationWarning])))
'''


def channel_means(path):
    """The descriptor ChannelMeans gives an image file: its ImageNet-normalised channels' means, computed here."""
    rgb = np.asarray(Image.open(path).convert('RGB')) / 255.0
    return ((rgb - IMAGENET_MEAN) / IMAGENET_STD).mean(axis=(0, 1))


def extracted_in_subprocess(folder, interpreter_method, chosen, output):
    """(descriptors, loader's start method, worker count, DeprecationWarnings) from EXTRACTION run with the
    interpreter's start method and NETVLAD_WORKER_START_METHOD=chosen (unset when None)."""
    environment = {k: v for k, v in os.environ.items() if k != images.START_METHOD_VARIABLE}
    environment.update({} if chosen is None else {images.START_METHOD_VARIABLE: chosen})
    environment['PYTHONPATH'] = os.pathsep.join([str(REPO), environment.get('PYTHONPATH', '')])
    done = subprocess.run([sys.executable, '-c', EXTRACTION, interpreter_method, str(folder), str(output)],
                          capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    used = json.loads(done.stdout.strip().splitlines()[-1])
    return np.load(output), used['method'], used['workers'], used['deprecations']


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('worker_images')
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return folder


@pytest.mark.parametrize('interpreter_method, chosen, expected', [
    ('fork', None, images.start_method('auto')),  # Python <= 3.13's default on Linux: the loaders still don't fork
    ('forkserver', None, images.start_method('auto')),  # Python 3.14's
    ('spawn', 'spawn', 'spawn'),  # macOS's, and the toolkit told to spawn
], ids=['default-fork', 'default-forkserver', 'spawn'])
def test_descriptors_through_workers_equal_in_process(image_folder, tmp_path, interpreter_method, chosen, expected):
    if expected not in __import__('multiprocessing').get_all_start_methods():
        pytest.skip(f'{expected} does not exist on this platform')
    descriptors, method, workers, deprecations = extracted_in_subprocess(image_folder, interpreter_method, chosen,
                                                                         tmp_path / 'descriptors.npy')
    assert (method, workers) == (expected, 2)
    assert method != 'fork'  # the process has threads running: a fork could deadlock (Python 3.12+ warns)
    assert deprecations == []
    reference = np.stack([channel_means(path) for path in sorted(image_folder.glob('*.png'))])
    np.testing.assert_allclose(descriptors, reference, atol=1e-5)


def test_the_default_never_forks_this_process(monkeypatch):
    monkeypatch.delenv(images.START_METHOD_VARIABLE, raising=False)
    assert images.start_method('auto') in ('forkserver', 'spawn')
    assert images.start_method('auto') == ('spawn' if sys.platform in ('darwin', 'win32') else 'forkserver')


@pytest.mark.parametrize('most', [0, 1, 2, 4])
@pytest.mark.parametrize('work', [0.0, 0.5, 2.99, 3.0, 6.5, 100.0])
@pytest.mark.parametrize('start', [0.0, 0.02, 3.0])
def test_each_worker_takes_over_at_least_its_start_cost(most, work, start):
    """The largest count up to `most` whose starts together cost no more than the work: found by trying every count."""
    repaid = [count for count in range(most + 1) if count * start <= work]
    assert images.worker_count(most, work, start) == max(repaid)


class ClockedItems:
    """A dataset whose items cost known seconds on a clock of its own: item i advances it by costs[i]."""

    def __init__(self, costs):
        self.costs, self.now, self.loaded = costs, 0.0, []

    def clock(self):
        return self.now

    def __len__(self):
        return len(self.costs)

    def __getitem__(self, index):
        self.loaded.append(index)
        self.now += self.costs[index]
        return index


@pytest.mark.parametrize('count', [1, 3, 50, 1000])
def test_the_loading_work_of_a_set_is_estimated_from_a_few_items(count):
    items = ClockedItems([0.25] * count)
    assert images.loading_seconds(items, items.clock) == pytest.approx(0.25 * count)
    assert len(items.loaded) == len(set(items.loaded)) == min(count, images.SAMPLED_ITEMS)
    assert {0, count - 1} <= set(items.loaded)  # spread over the set, first to last


def test_a_first_item_that_pays_one_time_costs_does_not_inflate_the_estimate():
    items = ClockedItems([50.0] + [0.01] * 199)
    assert images.loading_seconds(items, items.clock) == pytest.approx(0.01 * 200)


def test_an_empty_set_costs_nothing():
    items = ClockedItems([])
    assert images.loading_seconds(items, items.clock) == 0.0 and items.loaded == []


@pytest.mark.parametrize('method', ['forkserver', 'spawn'])
def test_a_set_gets_the_workers_its_loading_work_repays(monkeypatch, method):
    monkeypatch.setenv(images.START_METHOD_VARIABLE, method)
    start = images.WORKER_START_SECONDS[method]
    opt = argparse.Namespace(threads=2, cuda=False)
    monkeypatch.setattr(images, 'loading_seconds', lambda dataset: 0.9 * start)
    assert images.loading(opt, range(10))['num_workers'] == 0
    assert 'multiprocessing_context' not in images.loading(opt, range(10))
    monkeypatch.setattr(images, 'loading_seconds', lambda dataset: 2 * start)
    many = images.loading(opt, range(10))
    assert many['num_workers'] == min(2, os.cpu_count())
    assert many['multiprocessing_context'].get_start_method() == method


def test_no_item_is_loaded_to_estimate_when_no_worker_may_start():
    items = ClockedItems([1.0] * 10)
    assert images.loading(argparse.Namespace(threads=0, cuda=False), items)['num_workers'] == 0
    assert items.loaded == []


def test_the_training_loader_weighs_the_tuples_it_loads(monkeypatch):
    """The triplet loader's work is that of its tuples (each a query, a positive and its negatives), not a count of
    rows."""
    from netvlad_toolkit.training import training
    weighed = []
    monkeypatch.setenv(images.START_METHOD_VARIABLE, 'spawn')
    monkeypatch.setattr(images, 'loading_seconds', lambda dataset: weighed.append(dataset) or 0.0)
    triplets = [(0, 1, [2, 3]), (4, 5, [6])]
    loader = training.triplet_batches(list(range(7)), triplets, [[0, 1]], argparse.Namespace(threads=2, cuda=False))
    assert loader.num_workers == 0
    assert [type(dataset) for dataset in weighed] == [images.TripletImages]
    assert weighed[0].triplets == triplets


def test_an_unknown_start_method_is_a_user_error(monkeypatch):
    monkeypatch.setenv(images.START_METHOD_VARIABLE, 'thread')
    with pytest.raises(images.UserError, match=f'{images.START_METHOD_VARIABLE}.*thread'):
        images.loading(argparse.Namespace(threads=2, cuda=False), range(1000))


def test_the_forkserver_preloads_the_toolkit_modules_imported():
    """Every module of the toolkit's package imported so far, and nothing else (not the tests' own modules, not
    torch, not __main__)."""
    from netvlad_toolkit.training import training  # noqa: F401  (the triplet loader's module, as a train run has it)
    package = REPO / 'netvlad_toolkit'
    files = {'.'.join(path.relative_to(REPO).with_suffix('').parts).removesuffix('.__init__')
             for path in package.rglob('*.py')}
    imported = {name for name in sys.modules if name in files}
    assert set(images.toolkit_modules()) == imported
    assert {'netvlad_toolkit.datasets.images', 'netvlad_toolkit.training.training',
            'netvlad_toolkit.model.models'} <= imported and 'conftest' not in imported


def test_what_workers_unpickle_is_preloaded_from_the_first_extraction_on():
    """A forkserver starts at a run's first worker, with the toolkit modules imported by then (an extraction's):
    the modules of every dataset and collate function the toolkit's loaders send to workers, the training loader's
    included, are among them, so that no worker imports a toolkit module."""
    first_extraction = ('from netvlad_toolkit.datasets import datasets, images; '
                        'print(" ".join(images.toolkit_modules()))')
    done = subprocess.run([sys.executable, '-c', first_extraction], capture_output=True, text=True, cwd=REPO,
                          check=True)
    preloaded = set(done.stdout.split())
    from netvlad_toolkit.datasets import datasets
    from netvlad_toolkit.training import training
    sent_to_workers = [datasets.SplitImages, images.ImageList, images.stack_images, training.TripletImages,
                       training.collate_triplets]
    assert {thing.__module__ for thing in sent_to_workers} <= preloaded


PRELOADED = '''
import multiprocessing.forkserver, sys, types
if __name__ == '__main__':
    from netvlad_toolkit.datasets import datasets, images
    images.WORKER_START_SECONDS = dict.fromkeys(images.WORKER_START_SECONDS, 0)  # a worker even for two images
    opt = types.SimpleNamespace(threads=1, cuda=False)
    list(images.image_loader(images.ImageList(sys.argv[1:]), opt, 1))
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    with open(f'/proc/{server}/maps') as maps:
        print(any('/scipy' in line for line in maps))  # pittsburgh's scipy.io: loaded by preloading datasets
'''


@pytest.mark.skipif(not os.path.isdir('/proc/self') or images.start_method('auto') != 'forkserver',
                    reason='needs Linux /proc and the forkserver')
def test_the_forkserver_imports_the_toolkit_from_any_current_folder(image_folder, tmp_path):
    """Run from a folder other than the toolkit's (Python 3.11 to 3.13 ignore the parent's sys.path in the server),
    the forkserver has the toolkit's modules loaded, not only torch, so that no worker imports them."""
    environment = {k: v for k, v in os.environ.items() if k not in (images.START_METHOD_VARIABLE, 'PYTHONPATH')}
    script = tmp_path / 'preloaded.py'
    script.write_text(f'import sys\nsys.path.insert(0, {str(REPO)!r})\n' + PRELOADED)
    paths = [str(path) for path in sorted(image_folder.glob('*.png'))[:2]]
    done = subprocess.run([sys.executable, str(script), *paths], capture_output=True, text=True, cwd=tmp_path,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == 'True'
