"""Knowledge distillation of a trained run (the teacher) into a small torchvision network (the student) whose
descriptors live in the teacher's space, so that the student's queries search a database the teacher encoded
(asymmetric retrieval, Budnik & Avrithis, CVPR 2021).

The student is its own layers, a 1x1 conv projecting its last feature map to the teacher's local width, then a copy
of the teacher's pooling and whitening, then L2 normalisation: its descriptor has the teacher's dimension and
normalisation by construction, and the copied head gives the projection a target it can already be compared with.
Every layer of the student trains (the copied head too).

The loss has three terms, two means of 1 - cosine and a divergence of rankings:
- global: 1 - cos(student descriptor, teacher descriptor); for unit vectors that is half their squared L2 distance,
  the quantity the exact search ranks by, and unlike an element-wise MSE it does not shrink with the dimension;
- local (a hint, FitNets-style), weighted by --hint_weight: at every cell of the student's feature map, 1 - cos of
  the student's projected local feature and the teacher's local features (the input of its pooling) averaged over
  the image region the cell covers (the teacher's map resampled onto the student's grid by area averaging, each
  teacher feature L2-normalised first, as NetVLAD normalises its input). The global term alone is one target
  vector per image, reached only through the pooling's soft-assignment; the local term tells every cell of the
  projection what the teacher's pooling expects there, a far denser signal for a student trained from scratch.
- ranking, weighted by --rank_weight: the asymmetric search itself. The student's descriptor of an image, used as a
  query, ranks the teacher's descriptors of all the training images; so does the teacher's own descriptor of it. The
  term is the KL divergence of the student's softmax over those similarities (temperature RANKING_TEMPERATURE) from
  the teacher's. The cosine terms reward nearness to the teacher's descriptor, much of which is the component all
  images of an area share and which ranks the database at random; this term is met only by a descriptor that finds
  its own image (and the images the teacher finds as close) first.
The teacher is frozen, so its descriptors and resampled local features of the training images are computed once.

After every epoch the student's BatchNorm statistics are estimated again from one pass over the training images
(recalibrate_batch_norm): the running averages that training keeps trail weights that change fast, the more so at
torchvision MobileNetV3's momentum of 0.01, and a student evaluated with them describes images far from the teacher
even when its training-mode descriptors match it.
"""
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from netvlad_toolkit.datasets.images import image_loader
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import build_model, config_from_state_dict
from netvlad_toolkit.search.retrieval import autocast
from netvlad_toolkit.training.training import make_optimizer, tensorboard_writer


def student_for(teacher, student, pretrained, output_stride):
    """A new student of the torchvision network `student` (its feature map at `output_stride`) for `teacher` (an
    EmbedNet), ImageNet-initialised when `pretrained`, with a copy of the teacher's pooling and whitening."""
    pooling = getattr(teacher.pool, 'mode', 'netvlad')
    config = dict(config_from_state_dict(teacher.state_dict(), pooling), arch=student, encoder_channels=None,
                  local_dim=teacher.pool.dim, input_norm=False, first_trainable=0, output_stride=output_stride)
    model = build_model(config, pretrained)
    model.pool.load_state_dict(teacher.pool.state_dict())
    if hasattr(teacher, 'whiten'):
        model.whiten.load_state_dict(teacher.whiten.state_dict())
    return model


# Softmax temperature of the ranking term, on cosines of unit descriptors: a student descriptor must beat the
# other images' cosines by about this much to rank its own image first with confidence.
RANKING_TEMPERATURE = 0.05
# What an epoch reports of the student against the teacher (means over its steps), in its log, its checkpoint and
# TensorBoard: the two cosines, the ranking term, and how often an image's student descriptor finds the teacher's
# descriptor of the same image first among those of all training images (asymmetric Recall@1 on the training set).
EPOCH_MEASURES = ('descriptor_cosine', 'local_cosine', 'ranking_kl', 'own_image_first')


def distillation_loss(student_desc, teacher_desc):
    """Mean over the batch of 1 - cos(student, teacher) of [B, D] descriptors (both L2-normalised: the model's
    output), i.e. half their mean squared L2 distance."""
    return (1 - (student_desc * teacher_desc).sum(dim=1)).mean()


def local_feature_loss(student_local, teacher_local):
    """Mean over the batch and the cells of 1 - cos(student, teacher) of [B, D, h, w] local feature maps on one
    grid (the teacher's resampled by `teacher_local_targets`; neither needs to be normalised)."""
    return (1 - F.cosine_similarity(student_local, teacher_local, dim=1)).mean()


def ranking_loss(student_similarities, teacher_similarities):
    """Mean over the batch of KL(teacher || student) of the softmax at RANKING_TEMPERATURE over [B, N] cosines of
    each image's descriptor (the student's, the teacher's) to the teacher's descriptors of all N training images."""
    target = F.softmax(teacher_similarities / RANKING_TEMPERATURE, dim=1)
    return F.kl_div(F.log_softmax(student_similarities / RANKING_TEMPERATURE, dim=1), target, reduction='batchmean')


def teacher_local_targets(features, grid):
    """The teacher's local features [B, D, H, W] resampled onto the student's grid (h, w): each feature
    L2-normalised, then averaged over the region of the image each student cell covers."""
    return F.adaptive_avg_pool2d(F.normalize(features, p=2, dim=1), grid)


def teacher_targets(teacher, student, images, opt, device):
    """The teacher's descriptors [N, D] and local features resampled onto the student's grid (a list of N
    [D, h, w] tensors: images of different sizes give different grids) of every training image, computed once."""
    started = time.time()
    teacher = teacher.to(device).eval().to(memory_format=torch.channels_last)
    descriptors, local_targets, grids = [None] * len(images), [None] * len(images), {}
    with torch.inference_mode(), autocast(opt.precision, device):
        for batch, indices in tqdm(image_loader(images, opt, opt.cacheBatchSize), desc='teacher targets',
                                   unit='batch'):
            batch = batch.to(device).contiguous(memory_format=torch.channels_last)
            size = tuple(batch.shape[-2:])
            if size not in grids:
                grids[size] = student.feature_grid(*size)
            features = teacher.features(batch).float()
            for index, descriptor, local in zip(indices.tolist(), teacher.describe(features).cpu(),
                                                teacher_local_targets(features, grids[size]).cpu()):
                descriptors[index], local_targets[index] = descriptor, local
    logging.info('Teacher targets of %d training images (%d-D descriptors, local features on the student\'s '
                 'grid %s) in %.1f s', len(images), teacher.output_dim, ', '.join(f'{h}x{w}' for h, w in
                                                                                  grids.values()),
                 time.time() - started)
    return torch.stack(descriptors), local_targets


def distil(student, targets, images, opt, device, run_dir, state=None, on_checkpoint=None):
    """Train `student` for epochs state['epoch']+1 .. opt.nEpochs so that its descriptor and local features of
    images[i] approach targets (teacher_targets' pair) at i, checkpointing into run_dir after every epoch (the best
    epoch: the lowest mean loss). Returns the final state (epoch, epoch losses, ...)."""
    memory_format = training_memory_format(student, device)
    student = student.to(device).to(memory_format=memory_format)
    optimizer, scheduler = make_optimizer(student, opt)
    state = dict(state or {})
    if 'optimizer' in state:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
    epoch, step = state.get('epoch', 0), state.get('step', 0)
    epoch_losses = list(state.get('epoch_losses', []))
    writer = tensorboard_writer(run_dir)
    try:
        while epoch < opt.nEpochs:
            epoch += 1
            step, loss, measures = distil_epoch(student, targets, images, optimizer, opt, device, epoch, writer, step,
                                                memory_format)
            recalibrate_batch_norm(student, images, opt, device)
            scheduler.step()
            epoch_losses.append(loss)
            best_epoch = 1 + int(np.argmin(epoch_losses))
            writer.add_scalar('Train/epoch_loss', loss, epoch)
            logging.info('Epoch %d: distillation loss %.5f; the student against the teacher: descriptor cosine '
                         '%.4f, local-feature cosine %.4f, ranking KL %.4f, own image first among the teacher\'s '
                         'descriptors %.4f%s', epoch, loss, *measures.values(), ' *' if best_epoch == epoch else '')
            state = dict(epoch=epoch, step=step, epoch_losses=epoch_losses, best_epoch=best_epoch,
                         best_score=measures['descriptor_cosine'], **measures, recalls={},
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
            save_checkpoint(dict(model_state(student), **state, **opt.distilled), run_dir, best_epoch == epoch)
            if on_checkpoint is not None:
                on_checkpoint()
    finally:
        writer.close()
    return state


def recalibrate_batch_norm(student, images, opt, device):
    """Every BatchNorm's running mean and variance set to their averages over one pass of the training images (in
    batches of --cacheBatchSize, no gradients), the statistics the student's weights now give."""
    batches = tqdm(image_loader(images, opt, opt.cacheBatchSize), desc='BatchNorm statistics', unit='batch')
    torch.optim.swa_utils.update_bn(batches, student, device)


def training_memory_format(student, device):
    """Channels-last, except on the CPU for a network with depthwise convs (MobileNetV3), whose backward runs slower
    there in channels-last than in the default layout."""
    depthwise = any(isinstance(layer, torch.nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels
                    for layer in student.modules())
    return torch.contiguous_format if device.type == 'cpu' and depthwise else torch.channels_last


def distil_epoch(student, targets, images, optimizer, opt, device, epoch, writer, step,
                 memory_format=torch.channels_last):
    """One pass over the training images in an order drawn from (seed, epoch): (step count, mean loss, the means of
    EPOCH_MEASURES)."""
    generator = torch.Generator().manual_seed(opt.seed * 1000 + epoch)
    torch.manual_seed(opt.seed * 1000 + epoch)
    loader = image_loader(images, opt, opt.batchSize, shuffle=True, generator=generator)
    bank, target_locals = targets[0].to(device), targets[1]
    student.train()
    losses, measures = [], []
    with tqdm(loader, desc=f'epoch {epoch}/{opt.nEpochs}', unit='batch') as bar:
        for batch, indices in bar:
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast(opt.precision, device):
                local = student.features(batch)
            descriptors, teacher_descriptors = student.describe(local), bank[indices.to(device)]
            similarities = descriptors @ bank.T
            global_term = distillation_loss(descriptors, teacher_descriptors)
            local_term = local_feature_loss(local.float(), torch.stack([target_locals[i] for i in indices]).to(device))
            rank_term = ranking_loss(similarities, teacher_descriptors @ bank.T)
            loss = global_term + opt.hint_weight * local_term + opt.rank_weight * rank_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            own_first = (similarities.argmax(dim=1).cpu() == indices).float().mean()
            measures.append((1 - global_term.item(), 1 - local_term.item(), rank_term.item(), own_first.item()))
            bar.set_postfix(loss=f'{losses[-1]:.4f}')
            writer.add_scalar('Train/Loss', losses[-1], step)
            for name, value in zip(EPOCH_MEASURES, measures[-1]):
                writer.add_scalar(f'Train/{name}', value, step)
    return step, float(np.mean(losses)), dict(zip(EPOCH_MEASURES, np.mean(measures, axis=0).tolist()))
