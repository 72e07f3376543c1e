"""torch.hub entry: torch.hub.load(REPO_DIR, 'netvlad', source='local', run=RUN) returns the model of run folder RUN
(netvlad_api.load_run), with its preprocessing as `model.preprocess`.

torch.hub puts this repository first on sys.path to import this file, and the toolkit's modules have plain names
(models, datasets, images, ...). A module of the same name that another hub repository imported first would shadow
this toolkit's: the entry point checks that each module it uses comes from this repository, and stops with a clear
error otherwise."""
import os
import sys

dependencies = ['torch', 'torchvision', 'numpy', 'scipy', 'h5py', 'faiss', 'PIL', 'tqdm']
REPO = os.path.dirname(os.path.abspath(__file__))
TOOLKIT_MODULES = ('commons', 'models', 'netvlad', 'images', 'datasets', 'checkpoint', 'centroids', 'int8', 'runs',
                   'retrieval', 'netvlad_api')


def check_own_modules():
    for name in TOOLKIT_MODULES:
        module = sys.modules.get(name)
        origin = getattr(module, '__file__', None) or ''
        if module is not None and os.path.dirname(os.path.abspath(origin)) != REPO:
            raise ImportError(f'The module "{name}" already imported from {origin} shadows the NetVLAD toolkit\'s '
                              f'{name}.py: load the toolkit first, or in a process of its own.')


def netvlad(run, device='cpu', ckpt='latest', unsafe_load=False):
    """The model of run folder `run` on `device` (eval mode); `model.preprocess(path)` gives its input tensor."""
    check_own_modules()
    from netvlad_api import load_run
    model, preprocess = load_run(run, device, ckpt, unsafe_load)
    model.preprocess = preprocess
    return model
