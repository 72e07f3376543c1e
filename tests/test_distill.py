"""--mode=distill: the student's descriptor lives in the teacher's space (dimension, normalisation), the loss and
its gradient, asymmetric Recall@N against a brute-force search, a distilled run through every mode, resuming after a
kill, and bad input."""
import csv
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import REPO
from helpers import (
    CONFIGS,
    brute_force_positives,
    brute_force_recalls,
    error_paragraph,
    files_under,
    read_geometry,
    read_image,
    run_killed,
    save_run,
)
from netvlad_toolkit import cli
from netvlad_toolkit.datasets.images import ImageList
from netvlad_toolkit.model.checkpoint import checkpoint_path, model_state, save_checkpoint
from netvlad_toolkit.model.int8 import COMPILE_ENV
from netvlad_toolkit.model.models import STUDENT_STRIDES, STUDENTS, build_student_encoder
from netvlad_toolkit.runs.runs import open_run
from netvlad_toolkit.training.distillation import (
    RANKING_TEMPERATURE,
    distil_epoch,
    distillation_loss,
    local_feature_loss,
    ranking_loss,
    student_for,
    teacher_local_targets,
    teacher_targets,
)

FAST = ['--nGPU', '0', '--threads', '0', '--cacheBatchSize', '8']
STUDENT = 'mobilenet_v3_small'


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
    """(run folder, model) of a random AlexNet NetVLAD teacher (K=8, 2048-D)."""
    path = tmp_path_factory.mktemp('teachers') / 'teacher'
    return path, save_run(path, CONFIGS['float'])


@pytest.fixture(scope='module')
def training_images(tiny_data, tmp_path_factory):
    """An unlabelled folder of 8 training images (two levels deep)."""
    folder = tmp_path_factory.mktemp('unlabelled')
    (folder / 'street').mkdir()
    for i, source in enumerate(sorted((tiny_data / '000').glob('*.jpg'))[:8]):
        shutil.copy(source, folder / ('street' if i % 2 else '') / f'img{i}.jpg')
    return folder


@pytest.fixture(scope='module')
def stand_in_home(tmp_path_factory):
    """A TORCH_HOME holding a random stand-in for torchvision's ImageNet MobileNetV3-Small weights, under the file
    name torchvision looks for; returns (home, the stand-in state dict)."""
    home = tmp_path_factory.mktemp('torch_home_students')
    (home / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.manual_seed(31)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    name = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.url.rsplit('/', 1)[-1]
    torch.save(state, home / 'hub' / 'checkpoints' / name)
    return home, state


def distill_argv(teacher, images, out, *flags):
    return ['--mode=distill', f'--resume={teacher}', f'--student={STUDENT}', f'--image_dir={images}',
            f'--savePath={out}', '--nEpochs=2', '--batchSize=4', *FAST, *flags]


@pytest.fixture(scope='module')
def student_run(teacher_run, training_images, stand_in_home, tmp_path_factory):
    """A student distilled from teacher_run by the CLI on the default path (ImageNet-initialised: the stand-in)."""
    out = tmp_path_factory.mktemp('students') / 'student'
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('TORCH_HOME', str(stand_in_home[0]))
        assert cli.main(distill_argv(teacher_run[0], training_images, out)) == 0
    return out


def random_images(count=3, size=(64, 80), seed=0):
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('stride', STUDENT_STRIDES)
@pytest.mark.parametrize('student', list(STUDENTS))
@pytest.mark.parametrize('kind', ['float', 'pruned', 'whitened', 'imported'])
def test_student_descriptor_has_the_teachers_dimension_and_norm(kind, student, stride, tmp_path):
    # imported: as a MATLAB network, its own input normalisation and whitening (the student takes the project's input)
    config = dict(CONFIGS['whitened'], input_norm=True) if kind == 'imported' else CONFIGS[kind]
    teacher = save_run(tmp_path / 'teacher', config)
    model = student_for(teacher, student, False, stride).eval()
    assert model.feature_grid(64, 96) == (64 // stride, 96 // stride)
    with torch.no_grad():
        descriptors = model(random_images())
        teacher_descriptors = teacher(random_images())
    assert descriptors.shape == teacher_descriptors.shape
    assert not hasattr(model, 'input_norm')  # torchvision's students take ImageNet-normalised RGB, as given
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-5)
    for key, value in teacher.state_dict().items():  # the head is a copy of the teacher's
        if key.startswith(('pool.', 'whiten.')):
            assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize('student', ['mobilenet_v3_large', 'mobilenet_v3_small'])
def test_stride_16_is_torchvisions_own_dilated_mobilenet(student):
    """torchvision builds MobileNetV3 at output stride 16 itself (dilated=True, for segmentation): the student's
    stride-16 layers are the same convs, and with the same weights give the same map."""
    dilated = getattr(torchvision.models, student)(dilated=True).features.eval()
    encoder = build_student_encoder(student, False, 8, 16).eval()
    encoder[:-1].load_state_dict(dilated.state_dict())
    geometry = lambda network: [(conv.stride, conv.dilation, conv.padding) for conv in network.modules()  # noqa: E731
                                if isinstance(conv, torch.nn.Conv2d)]
    assert geometry(encoder[:-1]) == geometry(dilated)
    images = random_images(1, (96, 128))
    with torch.no_grad():
        assert torch.equal(encoder[:-1](images), dilated(images))


def test_resnet18_at_stride_16_keeps_its_weights_and_doubles_its_grid():
    torch.manual_seed(0)
    native = build_student_encoder('resnet18', False, 8, 32).eval()
    halved = build_student_encoder('resnet18', False, 8, 16).eval()
    halved.load_state_dict(native.state_dict())  # the same parameters, by name and shape
    with torch.no_grad():
        assert native(random_images(1, (96, 128))).shape[-2:] == (3, 4)
        assert halved(random_images(1, (96, 128))).shape[-2:] == (6, 8)
    last_stage = [conv for conv in halved[-2].modules() if isinstance(conv, torch.nn.Conv2d)]
    assert all(conv.stride == (1, 1) for conv in last_stage)
    assert all(conv.dilation == (2, 2) for conv in last_stage if conv.kernel_size == (3, 3))


def test_a_student_run_that_names_no_stride_loads_at_stride_32(teacher_run, tmp_path):
    """Student runs written before the choice of stride hold no output_stride: their students were stride 32."""
    student = student_for(teacher_run[1], STUDENT, False, 32)
    state = model_state(student)
    assert state.pop('output_stride') == 32
    save_checkpoint(dict(state, epoch=1, recalls={}, best_score=0.0), str(tmp_path / 'old'), True)
    loaded, _ = open_run(cli.parse_options(['--mode=test', f'--resume={tmp_path / "old"}']))
    assert loaded.output_stride == 32 and loaded.feature_grid(64, 96) == (2, 3)
    images = random_images(2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), student.eval()(images))


def test_the_students_imagenet_weights_come_from_torchvisions_cache(stand_in_home, monkeypatch, teacher_run):
    monkeypatch.setenv('TORCH_HOME', str(stand_in_home[0]))
    model = student_for(teacher_run[1], STUDENT, True, 16)
    for key, value in stand_in_home[1].items():
        if key.startswith('features.'):
            assert torch.equal(model.state_dict()[key.replace('features.', 'encoder.', 1)], value)


def test_loss_and_gradient_against_a_computation_here():
    rng = np.random.default_rng(5)
    raw = rng.normal(size=(4, 6))
    teacher = rng.normal(size=(4, 6))
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    raw_t = torch.tensor(raw, requires_grad=True)
    loss = distillation_loss(F.normalize(raw_t, dim=1), torch.tensor(teacher))
    loss.backward()
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    student = raw / norms
    expected = 0.5 * np.mean(np.sum((student - teacher) ** 2, axis=1))  # half the squared distance of unit vectors
    # d/d raw of mean(1 - s.t) with s = raw/|raw|: -(I - s s^T) t / (|raw| B)
    projected = teacher - np.sum(student * teacher, axis=1, keepdims=True) * student
    expected_grad = -projected / norms / len(raw)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(raw_t.grad.numpy(), expected_grad, rtol=1e-10, atol=1e-12)


def cosine_terms(student, teacher):
    """Per-vector 1 - cos of rows of two [N, D] arrays and the gradient of their mean with respect to `student`."""
    norms_s = np.linalg.norm(student, axis=1, keepdims=True)
    unit_s, unit_t = student / norms_s, teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    cosines = np.sum(unit_s * unit_t, axis=1)
    # d/ds of 1 - s.t/(|s||t|): -(t/|t| - cos s/|s|) / |s|
    gradient = -(unit_t - cosines[:, None] * unit_s) / norms_s / len(student)
    return 1 - cosines, gradient


def test_local_feature_loss_and_gradient_against_a_computation_here():
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(2, 5, 3, 4)), rng.normal(size=(2, 5, 3, 4))
    student_t = torch.tensor(student, requires_grad=True)
    loss = local_feature_loss(student_t, torch.tensor(teacher))
    loss.backward()
    as_rows = lambda maps: maps.transpose(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731 (one vector per cell)
    terms, gradient = cosine_terms(as_rows(student), as_rows(teacher))
    assert loss.item() == pytest.approx(terms.mean(), rel=1e-12)
    expected_grad = gradient.reshape(2, 3, 4, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(student_t.grad.numpy(), expected_grad, rtol=1e-10, atol=1e-12)


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def ranking_term(student, teacher, bank):
    """KL(teacher || student) of softmaxes over cosines to `bank`, and its gradient with respect to `student`
    (rows of all three are unit vectors)."""
    target, predicted = softmax(teacher @ bank.T / RANKING_TEMPERATURE), softmax(student @ bank.T / RANKING_TEMPERATURE)
    kl = np.sum(target * (np.log(target) - np.log(predicted)), axis=1)
    # d/ds of -sum_j p_j log q_j with q = softmax(s.b_j / T): sum_j (q_j - p_j) b_j / T
    return kl.mean(), (predicted - target) @ bank / RANKING_TEMPERATURE / len(student)


def test_ranking_loss_and_gradient_against_a_computation_here():
    rng = np.random.default_rng(8)
    unit = lambda rows: rows / np.linalg.norm(rows, axis=1, keepdims=True)  # noqa: E731
    bank, student = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(3, 5)))
    teacher = bank[[4, 0, 6]]
    student_t = torch.tensor(student, requires_grad=True)
    loss = ranking_loss(student_t @ torch.tensor(bank).T, torch.tensor(teacher @ bank.T))
    loss.backward()
    expected, expected_grad = ranking_term(student, teacher, bank)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(student_t.grad.numpy(), expected_grad, rtol=1e-8, atol=1e-12)


def test_the_ranking_term_punishes_one_descriptor_for_every_image_that_the_cosine_term_accepts():
    """The mean direction of the teacher's descriptors is as close to each of them as a descriptor of the image's own
    can be on the way there, but ranks every image's own descriptor no better than the others."""
    rng = np.random.default_rng(9)
    bank = rng.normal(size=(40, 64)) + 2.0  # a shared component, as NetVLAD descriptors of one city have
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    mean = np.tile(bank.mean(axis=0) / np.linalg.norm(bank.mean(axis=0)), (40, 1))
    own = bank + 1.2 * rng.normal(size=bank.shape) / 8  # each near its own image, further from it than the mean
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    cosine = lambda student: distillation_loss(torch.tensor(student), torch.tensor(bank)).item()  # noqa: E731
    ranking = lambda student: ranking_loss(torch.tensor(student @ bank.T), torch.tensor(bank @ bank.T)).item()  # noqa: E731
    assert cosine(mean) < cosine(own)
    assert ranking(mean) > ranking(own)


def test_teacher_local_features_are_normalised_then_averaged_over_each_student_cell():
    features = np.random.default_rng(7).normal(size=(2, 5, 6, 8))
    targets = teacher_local_targets(torch.tensor(features), (3, 2)).numpy()
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    expected = unit.reshape(2, 5, 3, 2, 2, 4).mean(axis=(3, 5))  # 2x4 blocks of the 6x8 map
    np.testing.assert_allclose(targets, expected, rtol=1e-12)


class NoWriter:
    def add_scalar(self, *args):
        pass


@pytest.mark.parametrize('hint_weight, rank_weight', [(0.0, 0.0), (0.5, 0.0), (0.5, 2.0)])
def test_an_epochs_loss_is_the_descriptor_term_plus_the_weighted_local_and_ranking_terms(
        hint_weight, rank_weight, teacher_run, training_images):
    """With a learning rate of 0 the student stays as it is, so the epoch's mean loss is the mean over its batches
    of the loss of that fixed student, computed here from the descriptors and feature maps."""
    opt = cli.parse_options(distill_argv(teacher_run[0], training_images, 'unused', f'--hint_weight={hint_weight}',
                                         f'--rank_weight={rank_weight}', '--batchSize=8'))
    images = ImageList(sorted(str(p) for p in training_images.rglob('*.jpg')), None)
    torch.manual_seed(1)
    student = student_for(teacher_run[1], STUDENT, False, 16)
    targets = teacher_targets(teacher_run[1], student, images, opt, torch.device('cpu'))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    _, loss, measures = distil_epoch(student, targets, images, optimizer, opt, torch.device('cpu'), 1, NoWriter(), 0)
    batch = torch.stack([images[i][0] for i in range(len(images))])
    student.train()  # as the epoch ran it (batch norm on the batch's statistics: one batch of all 8 images)
    with torch.no_grad():
        local = student.features(batch)
        descriptors = student.describe(local).numpy()
        teacher_local = teacher_run[1].eval().features(batch).numpy()
    teacher_desc = targets[0].numpy()
    global_term = np.mean(1 - np.sum(descriptors * teacher_desc, axis=1))  # both unit vectors
    unit = teacher_local / np.linalg.norm(teacher_local, axis=1, keepdims=True)
    grid = local.shape[-2:]
    assert targets[1][0].shape[-2:] == grid
    expected_targets = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(unit), grid).numpy()
    np.testing.assert_allclose(torch.stack(targets[1]).numpy(), expected_targets, atol=1e-5)
    as_rows = lambda maps: maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])  # noqa: E731
    local_terms, _ = cosine_terms(as_rows(local.numpy()), as_rows(expected_targets))
    rank_term, _ = ranking_term(descriptors, teacher_desc, teacher_desc)  # the bank: all 8 teacher descriptors
    own_first = np.mean(np.argmax(descriptors @ teacher_desc.T, axis=1) == np.arange(len(descriptors)))
    assert loss == pytest.approx(global_term + hint_weight * local_terms.mean() + rank_weight * rank_term, rel=1e-4)
    # the KL of two near-equal distributions is a small difference of float32 logarithms: compared absolutely
    assert measures == pytest.approx(dict(descriptor_cosine=1 - global_term, local_cosine=1 - local_terms.mean(),
                                          ranking_kl=rank_term, own_image_first=own_first), rel=1e-4, abs=1e-7)


def test_distillation_brings_the_student_towards_the_teacher(student_run, teacher_run, training_images):
    images = torch.stack([read_image(path).float() for path in sorted(training_images.rglob('*.jpg'))])
    trained, state = open_run(cli.parse_options(['--mode=test', f'--resume={student_run}']))
    torch.manual_seed(0)
    untrained = student_for(teacher_run[1], STUDENT, False, 16)
    with torch.no_grad():
        target = teacher_run[1].eval()(images)
        cosines = [(model.eval()(images) * target).sum(1).mean().item() for model in (untrained, trained)]
    assert state['epoch'] == 2 and state['epoch_losses'][1] < state['epoch_losses'][0]
    assert cosines[1] > cosines[0]


def test_the_students_batch_norm_statistics_are_those_of_its_final_weights_on_the_training_images(student_run,
                                                                                                    training_images):
    """Running averages trail weights that change fast; after each epoch they are estimated again, here from the
    one batch of all 8 training images (--cacheBatchSize 8)."""
    images = torch.stack([read_image(path).float() for path in sorted(training_images.rglob('*.jpg'))])
    student, _ = open_run(cli.parse_options(['--mode=test', f'--resume={student_run}']))
    first_conv, first_norm = student.encoder[0][0], student.encoder[0][1]
    with torch.no_grad():
        outputs = first_conv(images).numpy()  # the first BatchNorm's input
    per_channel = outputs.transpose(1, 0, 2, 3).reshape(outputs.shape[1], -1)
    np.testing.assert_allclose(first_norm.running_mean.numpy(), per_channel.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first_norm.running_var.numpy(), per_channel.var(axis=1, ddof=1), rtol=1e-4, atol=1e-6)


def test_asymmetric_recall_against_a_brute_force_search(student_run, teacher_run, tiny_data, tmp_path):
    runs = tmp_path / 'runs'
    assert cli.main(['--mode=test', f'--resume={student_run}', f'--database_run={teacher_run[0]}',
                      '--dataset=synthetic', f'--dataPath={tiny_data}', '--split=test', f'--runsPath={runs}',
                      *FAST]) == 0
    result_file, = student_run.glob('test_test*_asymmetric.json')  # named by the dataset when not the student's own
    result = json.loads(result_file.read_text())
    db_names, utm_db, q_names, utm_q = read_geometry(tiny_data / 'datasets' / 'pitts30k_test.mat')
    student = open_run(cli.parse_options(['--mode=test', f'--resume={student_run}']))[0].eval()
    with torch.no_grad():
        db_desc = teacher_run[1].eval()(torch.stack([read_image(tiny_data / n).float() for n in db_names])).numpy()
        q_desc = student(torch.stack([read_image(tiny_data / 'queries_real' / n).float() for n in q_names])).numpy()
    expected = brute_force_recalls(db_desc, q_desc, brute_force_positives(utm_db, utm_q, 25), [1, 5, 10, 20])
    for n, recall in expected.items():
        assert result['recalls'][str(n)] == pytest.approx(recall)
    record = json.loads((runs / 'results.jsonl').read_text().splitlines()[-1])
    assert record['database_encoder']['run'] == str(teacher_run[0])
    assert record['query_encoder']['run'] == str(student_run)
    assert record['teacher'] == str(teacher_run[0])
    assert 'queries against the alexnet trained database' in record['variant']


def test_a_database_run_of_another_dimension_is_an_error(student_run, tiny_data, tmp_path, capsys):
    other = tmp_path / 'other'
    save_run(other, CONFIGS['whitened'])
    assert cli.main(['--mode=test', f'--resume={student_run}', f'--database_run={other}', '--dataset=synthetic',
                      f'--dataPath={tiny_data}', f'--runsPath={tmp_path}', *FAST]) == 2
    assert '32-D' in error_paragraph(capsys.readouterr().err)


def test_the_distilled_run_reloads_through_every_mode(student_run, teacher_run, tiny_data, places, tmp_path,
                                                      monkeypatch):
    flags = json.loads((student_run / 'checkpoints' / 'flags.json').read_text())
    assert flags['teacher'] == str(teacher_run[0]) and flags['student'] == STUDENT
    runs, export = tmp_path / 'runs', tmp_path / 'features'
    data = ['--dataset=synthetic', f'--dataPath={tiny_data}', '--split=test', f'--runsPath={runs}']
    assert cli.main(['--mode=test', f'--resume={student_run}', *data, *FAST]) == 0
    record = json.loads((runs / 'results.jsonl').read_text().splitlines()[-1])
    assert record['teacher'] == str(teacher_run[0]) and record['arch'] == STUDENT
    database, photos, _ = places
    assert cli.main(['--mode=extract', f'--resume={student_run}', f'--image_dir={database}',
                      f'--export_dir={export}', *FAST]) == 0
    assert cli.main(['--mode=pairs', f'--descriptors={export / "global-feats-netvlad.h5"}', '--num_matched=3',
                      f'--output={tmp_path / "pairs.txt"}']) == 0
    assert cli.main(['--mode=query', f'--resume={student_run}', '--query', photos, f'--database={database}',
                      f'--export_dir={tmp_path / "answers"}', *FAST]) == 0
    assert cli.main(['--mode=export', '--format=onnx', f'--resume={student_run}',
                      f'--export_path={tmp_path / "student.onnx"}']) == 0
    import onnxruntime
    images = random_images(2)
    session = onnxruntime.InferenceSession(str(tmp_path / 'student.onnx'))
    onnx_desc = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    from netvlad_toolkit import api as netvlad_api
    model, _ = netvlad_api.load_run(str(student_run))
    np.testing.assert_allclose(onnx_desc, netvlad_api.describe(model, images), atol=1e-4)
    hub_model = torch.hub.load(str(REPO), 'netvlad', source='local', run=str(student_run))
    np.testing.assert_allclose(netvlad_api.describe(hub_model, images), onnx_desc, atol=1e-4)
    monkeypatch.setenv(COMPILE_ENV, '0')
    assert cli.main(['--mode=quantize', '--quantization_type=static', f'--resume={student_run}', *data,
                      '--calib_images=8', '--latency_size=64x80', *FAST]) == 0
    int8_model = open_run(cli.parse_options(['--mode=test', f'--resume={student_run}_quantized_static']))[0]
    assert int8_model.output_dim == teacher_run[1].output_dim
    record = json.loads((runs / 'results.jsonl').read_text().splitlines()[-1])
    assert record['teacher'] == str(teacher_run[0]) and record['variant'].endswith('+ int8 static')


def test_a_killed_distillation_continues_where_it_stopped(teacher_run, training_images, tmp_path):
    whole, killed = tmp_path / 'whole', tmp_path / 'killed'
    # both in a child process, which runs with the same threads (the same float sums) as the other
    assert run_killed(distill_argv(teacher_run[0], training_images, whole, '--fromscratch'),
                      'netvlad_toolkit.training.distillation', 'save_checkpoint', call=0) == 0
    argv = distill_argv(teacher_run[0], training_images, killed, '--fromscratch')
    assert run_killed(argv, 'netvlad_toolkit.training.distillation', 'save_checkpoint', 2) != 0  # killed before epoch 2's checkpoint
    assert torch.load(checkpoint_path(str(killed)), weights_only=False)['epoch'] == 1
    assert run_killed(argv, 'netvlad_toolkit.training.distillation', 'save_checkpoint', call=0) == 0
    expected = torch.load(checkpoint_path(str(whole)), weights_only=False)
    resumed = torch.load(checkpoint_path(str(killed)), weights_only=False)
    assert resumed['epoch'] == 2 and resumed['epoch_losses'] == expected['epoch_losses']
    for key, value in expected['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key


@pytest.fixture(scope='module')
def stride_16_run(teacher_run, training_images, tmp_path_factory):
    """A student distilled at output stride 16 for one epoch."""
    out = tmp_path_factory.mktemp('stride_16') / 'student'
    assert cli.main(distill_argv(teacher_run[0], training_images, out, '--fromscratch', '--student_stride=16',
                                 '--nEpochs=1')) == 0
    return out


def test_a_distillation_is_continued_only_with_its_own_stride_and_loss(stride_16_run, teacher_run, training_images,
                                                                      capsys):
    folder = stride_16_run.parent
    before = {path: (folder / path).read_bytes() for path in files_under(folder)}
    for flag, stored in [('--student_stride=32', 'output_stride=16 (asked: 32)'),
                         ('--rank_weight=0.5', 'rank_weight=1.0 (asked: 0.5)')]:
        argv = distill_argv(teacher_run[0], training_images, stride_16_run, '--fromscratch', '--student_stride=16',
                            flag)
        assert cli.main(argv) == 2
        assert stored in error_paragraph(capsys.readouterr().err)
        assert {path: (folder / path).read_bytes() for path in files_under(folder)} == before


def test_a_stride_16_student_keeps_its_stride_at_int8(stride_16_run, tiny_data, tmp_path, monkeypatch):
    student, checkpoint = open_run(cli.parse_options(['--mode=test', f'--resume={stride_16_run}']))
    assert checkpoint['output_stride'] == 16 and student.feature_grid(64, 96) == (4, 6)
    monkeypatch.setenv(COMPILE_ENV, '0')
    assert cli.main(['--mode=quantize', '--quantization_type=static', f'--resume={stride_16_run}',
                      '--dataset=synthetic', f'--dataPath={tiny_data}', '--split=test', f'--runsPath={tmp_path}',
                      '--calib_images=8', '--latency_size=64x80', *FAST]) == 0
    int8_model, _ = open_run(cli.parse_options(['--mode=test', f'--resume={stride_16_run}_quantized_static']))
    images = random_images(2, (64, 96))
    with torch.no_grad():
        assert int8_model.features(images).shape[-2:] == (4, 6)
        cosines = (int8_model(images) * student.eval()(images)).sum(dim=1)
    assert cosines.min() > 0.9  # the int8 program of the same dilated network


@pytest.fixture(scope='module')
def int8_teacher(teacher_run, clustered_data, tmp_path_factory):
    """An int8 run (a checkpoint that says so: the refusal comes before its program is read)."""
    path = tmp_path_factory.mktemp('int8_teacher') / 'run_quantized_static'
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(COMPILE_ENV, '0')
        assert cli.main(['--mode=quantize', '--quantization_type=static', f'--resume={teacher_run[0]}',
                          f'--dataPath={clustered_data}', f'--runsPath={path.parent}', '--calib_images=8',
                          '--split=test', '--latency_size=64x80', *FAST]) == 0
    return teacher_run[0].parent / 'teacher_quantized_static'


@pytest.mark.parametrize('case', ['not a run', 'unknown student', 'empty image folder', 'int8 teacher'])
def test_bad_input_is_one_paragraph_exit_2_and_nothing_written(case, teacher_run, training_images, tmp_path,
                                                                 request, capsys):
    out = tmp_path / 'out' / 'student'
    teacher, images, extra = teacher_run[0], training_images, []
    if case == 'not a run':
        teacher = tmp_path / 'not_a_run'
        teacher.mkdir()
    elif case == 'unknown student':
        extra = ['--student=vgg19']
    elif case == 'empty image folder':
        images = tmp_path / 'empty'
        images.mkdir()
    else:
        teacher = request.getfixturevalue('int8_teacher')
    before = files_under(tmp_path)
    assert cli.main(distill_argv(teacher, images, out, *extra)) == 2
    message = error_paragraph(capsys.readouterr().err)
    expected = {'not a run': 'does not exist', 'unknown student': '--student', 'empty image folder': 'holds no image',
                'int8 teacher': 'int8'}[case]
    assert expected in message
    assert files_under(tmp_path) == before and not (tmp_path / 'out').exists()


def test_the_mode_lists_its_flags():
    """python main.py --mode=distill --help lists the mode's own flags."""
    help_text = subprocess.run([sys.executable, str(REPO / 'main.py'), '--mode=distill', '--help'], capture_output=True,
                               text=True).stdout
    for flag in ('--student', '--image_dir', '--savePath', '--nEpochs', '--fromscratch'):
        assert flag in help_text, textwrap.shorten(help_text, 200)


def test_query_with_a_database_run_ranks_student_photos_among_teacher_descriptors(student_run, teacher_run, places,
                                                                                   tmp_path):
    database, photos, positions = places
    out = tmp_path / 'answers'
    assert cli.main(['--mode=query', f'--resume={student_run}', f'--database_run={teacher_run[0]}', '--query',
                      photos, f'--database={database}', f'--export_dir={out}', '--num_matched=4', *FAST]) == 0
    names = sorted(positions)
    student = open_run(cli.parse_options(['--mode=test', f'--resume={student_run}']))[0].eval()
    with torch.no_grad():
        db_desc = teacher_run[1].eval()(torch.stack([read_image(database / n).float() for n in names])).numpy()
        for i in range(3):
            photo_desc = student(read_image(photos / f'photo{i}.jpg').float()[None]).numpy()[0]
            order = np.argsort(-(db_desc @ photo_desc))[:4]
            with open(out / f'photo{i}.csv', newline='') as f:
                assert [row['database_image'] for row in csv.DictReader(f)] == [names[j] for j in order]
    assert (teacher_run[0] / 'query_database').is_dir()  # the teacher's descriptors, cached in the teacher's run
