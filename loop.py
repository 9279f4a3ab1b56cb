"""The training loop every method shares: pretrain (Appendix B.2's schedules around LARS steps) and train_step
(Section 5.1's gradient accumulation).

A method file builds its model and its loss and calls pretrain(args, model, loss_fn, views=..., after_step=...);
this file runs the algorithm. What keeps a run safe (the run folder, checkpoints, the stop on a signal, torchrun)
is named here and lives in support/.
"""
import os
import shlex
import sys
import time

import torch
from torch.utils.data import DataLoader

import common
from support import batched_views, distributed, runs
from support.errors import UserError, ending_workers, workers_ignore_signals


def pretrain(args, model, loss_fn, *, views, after_step=None, objective=""):
    """The self-supervised training loop shared by every method.

    model        nn.Module with an online encoder at `model.encoder` (the one evaluated and exported)
    loss_fn      (model, x1, x2) -> (loss, {name: scalar tensor}); the loss and each named term are logged;
                 with M views, (model, x1, ..., xM)
    views        ((blur_p, solarize_p[, jitter[, jitter_p]]) of view 1, of view 2, ...): Appendix B.5 augmentation
                 probabilities and, optionally, the colour jitter and its probability (default JITTER, BYOL's, with
                 p = JITTER_P); one entry per view made of each image (two for every method of the paper)
    after_step   (model, step, total_steps) -> {name: float}, called once per optimizer step (e.g. the EMA)
    Returns 0 when training finished, 128 + signal number when it was stopped by a signal (checkpoint saved).
    """
    device, data, run = start_run(args)  # torchrun, run folder, data: every check before any work
    steps_per_epoch = len(data.pretrain) // args.batch_size  # the incomplete last batch is dropped
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = common.scaled_lr(args.base_lr, args.batch_size)  # Appendix B.2: LR = LR_base * BatchSize / 256

    model = prepare_model(model, args, device)
    optimizer = common.LARS([p for p in model.parameters() if p.requires_grad], lr=0.0, weight_decay=args.weight_decay)
    step, start_epoch, partial = run.restore(model, optimizer, objective)  # --resume, or a new run's args.json
    distributed.replicate(model, args)
    sampler, loader = train_batches(data.pretrain, args, views, device, steps_per_epoch)
    knn_loaders = monitor_loaders(data, args, device)
    agreement = distributed.StopAgreement()  # the step after which every process stops on a signal

    with run.stop, ending_workers(loader):
        for epoch in range(start_epoch, args.epochs):
            start_step = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
            sampler.set_epoch(epoch, start_step)
            model.train()
            sums, extra, partial = runs.EpochSums(device, partial), {}, {}
            bar, batches = runs.progress_bar(epoch, args, start_step, steps_per_epoch), iter(loader)
            for _ in range(start_step, steps_per_epoch):
                lr = common.lr_at(step, total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with run.out_of_memory("while training", "--batch-size (or raise --accum-steps) or --image-size"):
                    terms = train_step(model, optimizer, loss_fn, batches, args.accum_steps, device)
                extra = after_step(model, step, total_steps) if after_step else {}  # BYOL: the EMA
                step += 1
                sums.add(terms)
                bar.update(1)
                log = (step - epoch * steps_per_epoch - start_step) % args.log_every == 0
                signum = agreement.after_step(run.stop.signum)  # all processes stop after the same step
                if log or signum:
                    loss = sums.mean_loss()
                    run.check_finite(loss, f"at step {step}")
                    sums.show(bar, loss, lr, extra, args.batch_size)
                if signum and step < (epoch + 1) * steps_per_epoch:  # at an epoch's end: finish it first
                    bar.close()
                    run.checkpoint(model, optimizer, step, epoch, sums.partial())
                    return run.stopped(signum, step)
            bar.close()
            row = sums.row(epoch, step, lr, extra, args.batch_size)
            run.check_finite(row["loss"], f"in epoch {epoch + 1}")
            if distributed.is_main() and (epoch + 1 == args.epochs
                                          or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
                row.update(monitor(model, knn_loaders, data, args, views, device, run))  # others wait below
            run.end_epoch(row, model, optimizer, step, epoch + 1)  # the row, then the checkpoint that records it
            signum = agreement.at_epoch_end(run.stop.signum)
            if signum:
                return run.stopped(signum, step)
    return run.finish(model)  # encoder.pt


def train_step(model, optimizer, loss_fn, micro_batches, accum_steps, device):
    """One optimizer step over `accum_steps` micro-batches (Section 5.1: gradients averaged over N consecutive
    micro-batches before the update). Each micro-batch loss is scaled by 1/N, so the summed gradient is the
    gradient of the mean loss over the whole batch; under torchrun the gradients are then averaged over the
    processes (support/distributed.py). Returns this process's batch-mean of each logged term (on device)."""
    totals = {}
    for _ in range(accum_steps):
        views = next(micro_batches)  # (x1, x2) for most methods, (x1, ..., xM) for multi-view ones
        with common.autocast(device):
            loss, terms = loss_fn(model, *(common.to_device(x, device) for x in views))
        (loss / accum_steps).backward()
        for name, value in {"loss": loss, **terms}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / accum_steps
    distributed.average_gradients([p for group in optimizer.param_groups for p in group["params"]])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


# ----------------------------------------------------------------------------------------------------------------
# The steps of pretrain, named
# ----------------------------------------------------------------------------------------------------------------
def start_run(args):
    """Join torchrun's processes, check the run folder and load the data, every check before any work; then create
    the run folder. Returns (device, data, runs.Run)."""
    distributed.check_world(args, distributed.launched_world_size())  # before joining: every process fails alone
    device = distributed.init_distributed(common.resolve_device(args.device))
    out = runs.check_run_folder(args, args.method)  # before any work; created below
    with distributed.rank0_first():  # one download
        data = common.load_data(args.dataset, args.data_dir, args.eval_split, args.subset)
    if len(data.pretrain) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(data.pretrain)} training images")
    if distributed.is_main():
        print(f"# images: {len(data.pretrain)} to pre-train on, {len(data.bank)} labelled in the k-NN bank, "
              f"{len(data.eval)} to evaluate on ({args.eval_split})")
        warn_if_cpu(args, device, len(data.pretrain) // args.batch_size)
        with runs.writing(out):
            out.mkdir(parents=True, exist_ok=True)
    return device, data, runs.Run(args, out, device)


SMOKE = ["--subset", "512", "--epochs", "2", "--batch-size", "128"]  # the README's smoke run: minutes on a CPU


def warn_if_cpu(args, device, steps_per_epoch):
    """A full run on the CPU is legitimate but takes weeks (BYOL's ResNet-18 at batch 1024 on CIFAR-10: 178 s per
    step on two cores, about 30 days): say so on stderr, with the smoke run that checks the whole path instead (the
    user's command with --subset; another run folder). Not for a run that is already a --subset smoke run."""
    if device.type != "cpu" or args.subset:
        return
    argv = sys.argv[1:] if os.path.basename(sys.argv[0]) == f"{args.method}.py" else ["--dataset", args.dataset]
    drop = {*SMOKE[::2], "--out-dir", "--accum-steps"}  # a flag, its --flag=value form, and the value after it
    kept = [a for i, a in enumerate(argv) if a.split("=")[0] not in drop and (i == 0 or argv[i - 1] not in drop)]
    smoke = "" if args.resume else f"; a smoke run checks the whole path first: python {args.method}.py " \
                                   f"{shlex.join(kept + SMOKE)}"
    print(f"warning: {'no GPU found: ' if args.device == 'auto' else ''}training on the CPU: {args.epochs} epochs x "
          f"{steps_per_epoch} steps of {args.batch_size} images ({args.arch}); the progress bar shows the time per "
          f"step (s/it) after the first step, and the run takes {args.epochs * steps_per_epoch} times that{smoke}",
          file=sys.stderr)


def prepare_model(model, args, device):
    """--sync-bn (the default under torchrun), the device, --compile."""
    if distributed.world_size() > 1 and getattr(args, "sync_bn", None) is not False:
        distributed.sync_batchnorm(model, device)
    return common.place(model, device, args.compile)


def train_batches(images, args, views, device, steps_per_epoch):
    """The epoch's micro-batches of views: made on the device from the uint8 split (batched_views.DeviceViews) for
    an in-memory dataset, else by torchvision in DataLoader workers. Returns (sampler, loader)."""
    sampler = common.EpochBatches(len(images), args.batch_size // args.accum_steps, steps_per_epoch,
                                  args.accum_steps, args.seed, distributed.rank(), distributed.world_size())
    if batched_views.use_device_data(args.augment, args.dataset):
        return sampler, batched_views.DeviceViews(batched_views.uint8_images(images).to(device), sampler,
                                                  args.dataset, args.image_size, views)
    train_set = common.Views(images, *(common.ssl_augmentation(args.dataset, args.image_size, *v) for v in views))
    return sampler, DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                               pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                               worker_init_fn=workers_ignore_signals)


def on_device(args):
    return batched_views.use_device_data(args.augment, args.dataset)


def monitor_loaders(data, args, device):
    """The k-NN monitor's bank and eval batches (rank 0 alone evaluates)."""
    if not distributed.is_main():
        return None, None
    return batched_views.eval_loaders(data, args.dataset, args.image_size, 512, args.workers,
                                      device if on_device(args) else None)


def monitor(model, knn_loaders, data, args, views, device, run):
    """Rank 0's evaluation at an epoch's end: the weighted k-NN top-1 and the uniformity analysis."""
    t1, row = time.time(), {}
    with run.out_of_memory("in the k-NN evaluation", "--image-size or --analysis-samples"):
        row["knn_top1"] = common.knn_accuracy(model.encoder, *knn_loaders, data.num_classes, device, args.knn_k,
                                              args.knn_t)
        if args.analysis_samples:
            images = common.analysis_images(data.eval, args.analysis_samples)
            row.update(representation_analysis(model, images, args.dataset, args.image_size, views,
                                               getattr(args, "pow", None) or "a2", device, args.workers,
                                               on_device(args)))
    row["eval_seconds"] = round(time.time() - t1, 3)
    return row


def representation_analysis(model, images, dataset, image_size, views, power, device, workers=0, on_device=False):
    """common.analysis_row on a fixed set of eval images (labels unused): the clean images through the evaluation
    transform, and two augmented views of each, the same at every evaluation (alignment is between the first two of
    `views`: a multi-view method's first pair). on_device: the images (of an in-memory dataset) are transformed on
    the device by eval_view and batched_view; otherwise per image by PIL in DataLoader workers."""
    views = views[:2]
    clean = (x for x, _ in batched_views.eval_batches(images, dataset, image_size, 256, workers,
                                                      device if on_device else None))
    if on_device:
        g = torch.Generator(device).manual_seed(0)
        pairs = (tuple(batched_views.batched_view(x, dataset, image_size, *v, g=g) for v in views)
                 for x in batched_views.uint8_images(images).to(device).split(256))
    else:
        pairs = DataLoader(common.Views(images, *(common.ssl_augmentation(dataset, image_size, *v) for v in views)),
                           sampler=[(i, i) for i in range(len(images))],  # seed i for image i
                           batch_size=256, num_workers=workers, worker_init_fn=workers_ignore_signals)
    return common.analysis_row(model, clean, pairs, power, device)
