"""Knowledge distillation of a trained run (the teacher) into a small torchvision network (the student) whose
descriptors live in the teacher's space, so that the student's queries search a database the teacher encoded
(asymmetric retrieval, Budnik & Avrithis, CVPR 2021).

The student is its own layers, a 1x1 conv projecting its last feature map to the teacher's local width, then a copy
of the teacher's pooling and whitening, then L2 normalisation: its descriptor has the teacher's dimension and
normalisation by construction, and the copied head gives the projection a target it can already be compared with.
Every layer of the student trains (the copied head too).

The loss is 1 - cos(student, teacher), averaged over the batch; for unit vectors that is half their squared L2
distance, the quantity the exact search ranks by, and unlike an element-wise MSE it does not shrink with the
descriptor's dimension. The teacher is frozen, so its descriptors of the training images are computed once.
"""
import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from netvlad_toolkit.datasets.images import image_loader
from netvlad_toolkit.model.checkpoint import model_state, save_checkpoint
from netvlad_toolkit.model.models import build_model, config_from_state_dict
from netvlad_toolkit.search.retrieval import autocast, extract_descriptors
from netvlad_toolkit.training.training import make_optimizer, tensorboard_writer


def student_for(teacher, student, pretrained):
    """A new student of the torchvision network `student` for `teacher` (an EmbedNet), ImageNet-initialised when
    `pretrained`, with a copy of the teacher's pooling and whitening."""
    pooling = getattr(teacher.pool, 'mode', 'netvlad')
    config = dict(config_from_state_dict(teacher.state_dict(), pooling), arch=student, encoder_channels=None,
                  local_dim=teacher.pool.dim, input_norm=False, first_trainable=0)
    model = build_model(config, pretrained)
    model.pool.load_state_dict(teacher.pool.state_dict())
    if hasattr(teacher, 'whiten'):
        model.whiten.load_state_dict(teacher.whiten.state_dict())
    return model


def distillation_loss(student_desc, teacher_desc):
    """Mean over the batch of 1 - cos(student, teacher) of [B, D] descriptors (both L2-normalised: the model's
    output), i.e. half their mean squared L2 distance."""
    return (1 - (student_desc * teacher_desc).sum(dim=1)).mean()


def teacher_descriptors(teacher, images, opt, device):
    """The teacher's descriptors [N, D] float32 of every training image, computed once."""
    started = time.time()
    targets = extract_descriptors(teacher.to(device).to(memory_format=torch.channels_last), images, opt, device,
                                  'teacher descriptors')
    logging.info('Teacher descriptors of %d training images (%d-D) in %.1f s', len(images), targets.shape[1],
                 time.time() - started)
    return torch.from_numpy(targets)


def distil(student, targets, images, opt, device, run_dir, state=None, on_checkpoint=None):
    """Train `student` for epochs state['epoch']+1 .. opt.nEpochs so that its descriptor of images[i] approaches
    targets[i], checkpointing into run_dir after every epoch (the best epoch: the lowest mean loss). Returns the final
    state (epoch, epoch losses, ...)."""
    student = student.to(device).to(memory_format=torch.channels_last)
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
            step, loss = distil_epoch(student, targets, images, optimizer, opt, device, epoch, writer, step)
            scheduler.step()
            epoch_losses.append(loss)
            best_epoch = 1 + int(np.argmin(epoch_losses))
            writer.add_scalar('Train/epoch_loss', loss, epoch)
            logging.info('Epoch %d: distillation loss %.5f (mean cosine to the teacher %.4f)%s', epoch, loss,
                         1 - loss, ' *' if best_epoch == epoch else '')
            state = dict(epoch=epoch, step=step, epoch_losses=epoch_losses, best_epoch=best_epoch,
                         best_score=1 - min(epoch_losses), recalls={}, optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict())
            save_checkpoint(dict(model_state(student), **state, **opt.distilled), run_dir, best_epoch == epoch)
            if on_checkpoint is not None:
                on_checkpoint()
    finally:
        writer.close()
    return state


def distil_epoch(student, targets, images, optimizer, opt, device, epoch, writer, step):
    """One pass over the training images in an order drawn from (seed, epoch): (step count, mean loss)."""
    generator = torch.Generator().manual_seed(opt.seed * 1000 + epoch)
    torch.manual_seed(opt.seed * 1000 + epoch)
    loader = image_loader(images, opt, opt.batchSize, shuffle=True, generator=generator)
    student.train()
    losses = []
    with tqdm(loader, desc=f'epoch {epoch}/{opt.nEpochs}', unit='batch') as bar:
        for batch, indices in bar:
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast(opt.precision, device):
                descriptors = student(batch)
            loss = distillation_loss(descriptors.float(), targets[indices].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f'{losses[-1]:.4f}')
            writer.add_scalar('Train/Loss', losses[-1], step)
    return step, float(np.mean(losses))
