"""--mode=distill: a trained run (the teacher, --resume) distilled into a MobileNetV3 or ResNet18 student whose
descriptors live in the teacher's space (see distillation.py), written as the run folder
<teacher>_distilled_<student>; running the same command again after a kill continues it from its last checkpoint.

Training images need no labels: an image folder (--image_dir) or the images of the dataset's train split.
"""
import logging
import os
import time

from netvlad_toolkit.datasets.datasets import load_dataset
from netvlad_toolkit.datasets.folder_dataset import images_in
from netvlad_toolkit.datasets.images import ImageList
from netvlad_toolkit.model.checkpoint import checkpoint_path
from netvlad_toolkit.model.models import STUDENT_STRIDES, STUDENTS
from netvlad_toolkit.runs.results import variant_of
from netvlad_toolkit.runs.runs import (
    check_new_run_folder,
    derived_run_folder,
    flags_to_store,
    open_other_run,
    open_run,
    run_folder,
)
from netvlad_toolkit.training.distillation import distil, student_for, teacher_targets
from netvlad_toolkit.training.training import add_optimizer_flags
from netvlad_toolkit.utils.commons import UserError, atomic_write_json, make_deterministic, select_device, setup_logging
from netvlad_toolkit.utils.options import (
    AT_LEAST_1,
    add_common_flags,
    add_dataset_flags,
    add_extraction_flags,
    add_network_flags,
    add_run_flags,
    number_in,
)

# --resume names the teacher: the student takes its data, never its optimiser or training settings.
REUSES_RUN_TRAINING = False
# Flags a continued distillation must share with the run it continues.
SAME_ON_CONTINUE = ('teacher', 'student', 'output_stride', 'hint_weight', 'rank_weight')


def add_flags(p):
    add_common_flags(p)
    add_dataset_flags(p)
    add_network_flags(p)
    add_run_flags(p, required=True)
    add_extraction_flags(p)
    group = p.add_argument_group('distillation')
    group.add_argument('--student', default='mobilenet_v3_large', choices=list(STUDENTS),
                       help='The torchvision network to distil the --resume run (the teacher) into; ImageNet-'
                            'initialised unless --fromscratch.')
    group.add_argument('--student_stride', type=int, default=32, choices=STUDENT_STRIDES,
                       help='Output stride of the student\'s feature map. 32: the torchvision network as it is; '
                            '16: its last stage dilated (DeepLab\'s output stride 16, the same ImageNet weights), the '
                            'stride of the VGG16 and AlexNet conv5 maps a teacher pools, at more MACs.')
    group.add_argument('--image_dir', default=None,
                       help='Folder of training images (unlabelled, any depth); default: the images (database and '
                            'queries) of the train split of --dataset.')
    group.add_argument('--savePath', default=None,
                       help='Run folder of the student (default: <teacher run>_distilled_<student>). Running the same '
                            'command again continues the run in it from its last checkpoint.')
    group.add_argument('--nEpochs', type=AT_LEAST_1, default=10, help='Epochs of distillation.')
    group.add_argument('--batchSize', type=AT_LEAST_1, default=16, help='Training images per step.')
    group.add_argument('--hint_weight', type=number_in(float, 0), default=1.0,
                       help='Weight of the local-feature term of the loss (1 - cosine of the student\'s projected '
                            'local features and the teacher\'s, resampled onto the student\'s grid), added to the '
                            'descriptor term (1 - cosine of the descriptors); 0: the descriptor term alone.')
    group.add_argument('--rank_weight', type=number_in(float, 0), default=1.0,
                       help='Weight of the ranking term of the loss: the KL divergence of the student\'s softmax over '
                            'the cosines of its descriptor to the teacher\'s descriptors of all training images from '
                            'the teacher\'s own (the asymmetric search as a loss); 0: the cosine terms alone.')
    add_optimizer_flags(group)
    p.set_defaults(optim='ADAM', lr=0.001)


def open_teacher(opt):
    """The teacher model and checkpoint of --resume (any float run); an int8 run is refused."""
    teacher, checkpoint = open_run(opt)
    if 'quantized' in checkpoint:
        raise UserError(f'--resume={opt.resume} holds an int8 model (--mode=quantize): its encoder is a fixed int8 '
                        f'program, whose descriptors are an approximation of its float run\'s. Distil the float run '
                        f'it was made from ({checkpoint.get("source_run", "its source run")}) instead, and quantize '
                        f'the student afterwards. Nothing was written.')
    return teacher.eval(), checkpoint


def training_images(opt):
    """The unlabelled training images: --image_dir, else the train split's database and queries."""
    if opt.image_dir:
        return ImageList(images_in(opt.image_dir, '--image_dir'), opt.resize)
    truth = load_dataset(opt, 'train').db_struct
    return ImageList(truth.db_paths + truth.query_paths, opt.resize)


def student_run(opt, teacher, out_dir):
    """(student, training state): the run in out_dir to continue, or a new student (state None)."""
    if not os.path.isfile(checkpoint_path(out_dir)):
        check_new_run_folder(out_dir)
        return student_for(teacher, opt.student, not opt.fromscratch, opt.student_stride), None
    student, state = open_other_run(opt, out_dir)
    # runs written before a term of the loss or the choice of stride existed name none: they trained without it
    stored = {'hint_weight': 0.0, 'rank_weight': 0.0, **state, 'output_stride': student.output_stride}
    differing = [f'{key}={stored.get(key)} (asked: {opt.distilled[key]})' for key in SAME_ON_CONTINUE
                 if stored.get(key) != opt.distilled[key]]
    if differing:
        raise UserError(f'{out_dir} holds another distillation than the one asked for: {", ".join(differing)}. '
                        f'Give another --savePath, or move that folder away. Nothing was written.')
    logging.info('Continuing the distillation in %s after epoch %d', out_dir, state.get('epoch', 0))
    return student, state


def write_flags(opt, out_dir):
    atomic_write_json(flags_to_store(opt, 'distilled'), os.path.join(out_dir, 'checkpoints', 'flags.json'))


def distill(opt):
    make_deterministic(opt.seed)
    teacher, teacher_checkpoint = open_teacher(opt)
    opt.teacher = os.path.normpath(opt.resume)
    opt.distilled = dict(teacher=opt.teacher, teacher_arch=teacher.arch, student=opt.student,
                         output_stride=opt.student_stride, hint_weight=opt.hint_weight, rank_weight=opt.rank_weight,
                         variant=f'distilled from {teacher.arch} {variant_of(teacher_checkpoint)}')
    out_dir = opt.savePath or derived_run_folder(opt.resume, f'distilled_{opt.student}')
    images = training_images(opt)
    with run_folder(out_dir):
        student, state = student_run(opt, teacher, out_dir)
        if state is not None and state.get('epoch', 0) >= opt.nEpochs:
            logging.info('%s holds the distillation already done (%d epochs): nothing to do; give a larger '
                         '--nEpochs to continue it.', out_dir, state['epoch'])
            return state
        setup_logging(out_dir)  # only now: a run that stops on its input writes nothing
        device = select_device(opt)
        logging.info('Distilling %s (%s, %d-D) into %s (output stride %d, %s) on %d images: %s, lr %g, batch %d, '
                     '%d epochs', opt.resume, teacher.arch, teacher.output_dim, opt.student, opt.student_stride,
                     'random init' if opt.fromscratch else 'ImageNet init', len(images), opt.optim, opt.lr,
                     opt.batchSize, opt.nEpochs)
        started = time.time()
        targets = teacher_targets(teacher, student, images, opt, device)
        state = distil(student, targets, images, opt, device, out_dir, state,
                       on_checkpoint=lambda: write_flags(opt, out_dir))
        logging.info('====> Distillation done in %.1f min: epoch %d, mean cosine to the teacher %.4f; the student '
                     'run is %s', (time.time() - started) / 60, state['epoch'], state['descriptor_cosine'], out_dir)
    return state
