"""torch.hub entry: torch.hub.load(REPO_DIR, 'netvlad', source='local', run=RUN) returns the model of run folder RUN
(netvlad_toolkit.api.load_run), with its preprocessing as `model.preprocess`. Everything it imports lives in the
netvlad_toolkit package, so it neither shadows nor is shadowed by a project's own `models`, `datasets`, ..."""

dependencies = ['torch', 'torchvision', 'numpy', 'scipy', 'h5py', 'faiss', 'PIL', 'tqdm']


def netvlad(run, device='cpu', ckpt='latest', unsafe_load=False):
    """The model of run folder `run` on `device` (eval mode); `model.preprocess(path)` gives its input tensor."""
    from netvlad_toolkit.api import load_run
    model, preprocess = load_run(run, device, ckpt, unsafe_load)
    model.preprocess = preprocess
    return model
