"""--mode=import: the authors' MATLAB struct export read into a normal run folder; the imported model against the
authors' network computed from the format's description (tests/helpers.matlab_forward); files in other layouts."""
import os

import numpy as np
import pytest
import scipy.io
import torch

from helpers import error_paragraph, files_under, matlab_forward, matlab_network, write_matlab_network
from netvlad_toolkit.model.checkpoint import read_checkpoint
from netvlad_toolkit.runs.runs import open_run

VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
SMALL_WIDTHS = [8] * 7 + [16] * 6
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def average_image(rng):
    """An H x W x 3 average image whose pixel [0, 0] (the one used) differs from the others."""
    image = np.full((4, 5, 3), 200.0)
    image[0, 0] = rng.uniform(90, 130, 3)
    return image


def project_input(rgb01):
    """The tensor the project's image loader gives for RGB in [0, 1]: ImageNet mean and std."""
    return ((rgb01 - torch.from_numpy(IMAGENET_MEAN)[None, :, None, None])
            / torch.from_numpy(IMAGENET_STD)[None, :, None, None]).float()


def import_file(run_cli, net, tmp_path, name='net_struct.mat'):
    path = tmp_path / name
    write_matlab_network(path, net)
    run = tmp_path / 'imported'
    assert run_cli(['--mode=import', '--matlab', path, '--savePath', run, '--nocuda']) == 0
    return run


def load_run(make_opt, run):
    return open_run(make_opt(['--mode=test', '--resume', run]))


@pytest.fixture(scope='module')
def vgg16_import(tmp_path_factory):
    """A full-width VGG16 network (K=8, whitening to 16) imported once for the module."""
    from netvlad_toolkit import cli
    tmp_path = tmp_path_factory.mktemp('vgg16_import')
    net = matlab_network(np.random.default_rng(0), VGG16_WIDTHS, clusters=8, out_dim=16,
                         average_image=average_image(np.random.default_rng(1)))
    run = import_file(lambda argv: cli.main([str(a) for a in argv]), net, tmp_path)
    return net, run


@pytest.mark.parametrize('size', [(64, 80), (70, 90)])
def test_imported_descriptor_equals_the_authors_network(vgg16_import, make_opt, size):
    net, run = vgg16_import
    model, _ = load_run(make_opt, run)
    rgb01 = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(size[0]), dtype=torch.float64)
    expected = matlab_forward(net, rgb01 * 255)
    with torch.no_grad():
        got = model.eval()(project_input(rgb01)).double()
    assert got.shape == (2, 16)
    assert (got - expected).abs().max().item() <= 1e-5


def test_imported_run_is_a_normal_checkpoint(vgg16_import, make_opt):
    net, run = vgg16_import
    checkpoint = torch.load(os.path.join(run, 'checkpoints', 'checkpoint.pth.tar'), weights_only=True)
    state = checkpoint['state_dict']
    assert {'epoch', 'state_dict', 'recalls', 'best_score', 'parallel'} <= set(checkpoint)
    assert state['pool.conv.weight'].shape == (8, 512, 1, 1) and state['pool.centroids'].shape == (8, 512)
    assert state['whiten.weight'].shape == (16, 8 * 512) and state['whiten.bias'].shape == (16,)
    # centroids negated back; whitening columns moved from d*K + k to k*D + d
    centroids = np.asarray(net['layers'][30]['weights'][1])  # [D, K]
    np.testing.assert_allclose(state['pool.centroids'].numpy(), -centroids.T)
    projection = np.asarray(net['layers'][33]['weights'][0]).reshape(512 * 8, 16)
    d, k = 300, 5
    np.testing.assert_allclose(state['whiten.weight'][:, k * 512 + d].numpy(), projection[d * 8 + k])
    np.testing.assert_allclose(state['input_norm.mean'].numpy(),
                               net['meta']['normalization']['averageImage'][0, 0], rtol=1e-6)
    assert read_checkpoint(os.path.join(run, 'checkpoints', 'checkpoint.pth.tar'))['variant'] == checkpoint['variant']


def test_average_image_as_a_vector(run_cli, make_opt, tmp_path):
    net = matlab_network(np.random.default_rng(2), SMALL_WIDTHS, clusters=4, out_dim=8,
                         average_image=np.array([123.7, 116.8, 103.9]))
    run = import_file(run_cli, net, tmp_path)
    model, _ = load_run(make_opt, run)
    rgb01 = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        got = model.eval()(project_input(rgb01)).double()
    assert (got - matlab_forward(net, rgb01 * 255)).abs().max().item() <= 1e-5


def drop_layer_33(net):
    net['layers'] = net['layers'][:33]
    return 'has 33 layers, but the whitening is layer 33'


def wrong_vlad_shape(net):
    net['layers'][30]['weights'][1] = net['layers'][30]['weights'][1][:8]
    return 'net.layers[30] (NetVLAD, vlad_core): weights[1] has shape (8, 4)'


def no_average_image(net):
    del net['meta']['normalization']['averageImage']
    return 'net.meta.normalization has no field `averageImage`'


def no_conv_weights(net):
    del net['layers'][5]['weights']
    return 'net.layers[5] (VGG16 conv, conv5) has no field `weights`'


def wrong_kernel_input(net):
    net['layers'][2]['weights'][0] = net['layers'][2]['weights'][0][:, :, :4]
    return 'weights[0] has shape (3, 3, 4, 8)'


@pytest.mark.parametrize('damage', [drop_layer_33, wrong_vlad_shape, no_average_image, no_conv_weights,
                                    wrong_kernel_input])
def test_other_layouts_are_refused_naming_what_is_missing(damage, tmp_path, capsys):
    from netvlad_toolkit import cli
    net = matlab_network(np.random.default_rng(4), SMALL_WIDTHS, clusters=4, out_dim=8,
                         average_image=np.array([120., 110., 100.]))
    expected = damage(net)
    path = tmp_path / 'damaged.mat'
    write_matlab_network(path, net)
    assert cli.main(['--mode=import', '--matlab', str(path), '--savePath', str(tmp_path / 'run')]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert expected in message and 'damaged.mat' in message
    assert files_under(tmp_path) == ['damaged.mat']


@pytest.mark.parametrize('content', ['not a mat file', 'other variable'])
def test_not_a_network_file(content, tmp_path, capsys):
    from netvlad_toolkit import cli
    path = tmp_path / 'other.mat'
    if content == 'not a mat file':
        path.write_text('hello')
    else:
        scipy.io.savemat(str(path), {'dbStruct': np.zeros(3)})
    assert cli.main(['--mode=import', '--matlab', str(path), '--savePath', str(tmp_path / 'run')]) == 2
    message = error_paragraph(capsys.readouterr().err)
    assert 'other.mat' in message
    assert ('no variable `net`' in message) == (content == 'other variable')
    assert files_under(tmp_path) == ['other.mat']


def test_imported_run_in_every_mode(tiny_data, tmp_path, run_cli, make_opt, monkeypatch):
    """test, pca (a new whitening in place of the authors'), prune, quantize and export all take the imported run,
    and the re-normalisation travels with the model into each derived run."""
    from netvlad_toolkit.model import int8
    monkeypatch.setenv(int8.COMPILE_ENV, '0')  # the uncompiled int8 program: same arithmetic, no C++ build
    fast = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8', '--latency_size', '64x80', '--split', 'val',
            f'--dataPath={tiny_data}', f'--runsPath={tmp_path}']
    net = matlab_network(np.random.default_rng(5), SMALL_WIDTHS, clusters=4, out_dim=8,
                         average_image=average_image(np.random.default_rng(6)))
    run = import_file(run_cli, net, tmp_path)
    mean = torch.from_numpy(net['meta']['normalization']['averageImage'][0, 0]).float()
    assert run_cli(['--mode=test', f'--resume={run}', *fast]) == 0
    assert run_cli(['--mode=pca', f'--resume={run}', '--pca_dim=16', '--pca_images=60', *fast]) == 0
    assert run_cli(['--mode=prune', f'--resume={run}', '--pruning_type=unstructured', '--finetune_epochs=0',
                    *fast]) == 0
    assert run_cli(['--mode=prune', f'--resume={run}', '--pruning_layers=0,2', '--finetune_epochs=0', *fast]) == 0
    assert run_cli(['--mode=quantize', f'--resume={run}', '--calib_images=8', *fast]) == 0
    for derived, dim in [('imported_pca16', 16), ('imported_pruned_unstructured_20', 8),
                         ('imported_pruned_structured_20', 8)]:
        model, _ = load_run(make_opt, tmp_path / derived)
        assert model.output_dim == dim and torch.equal(model.input_norm.mean, mean)
    int8, _ = load_run(make_opt, tmp_path / 'imported_quantized_static')
    model, _ = load_run(make_opt, run)
    images = project_input(torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    with torch.no_grad():
        cosine = (int8(images) * model.eval()(images)).sum(dim=1)
    assert cosine.min() > 0.9  # int8 of the re-normalised input; without it the descriptors would be unrelated
    assert run_cli(['--mode=export', f'--resume={tmp_path / "imported_pca16"}',
                    '--export_path', tmp_path / 'pca.onnx']) == 0
