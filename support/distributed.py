"""torchrun + torch.distributed: join the group, gather with gradients, average gradients, BatchNorm over the global
batch, agree on a stop signal; rank 0 alone writes. A plain `python script.py` is one process and none of this runs.

Every process holds the whole model and takes its share of each global micro-batch. The global loss is the mean
of the processes' losses: per-sample terms are local batch means, batch-wide terms (Eq. 1, Eq. 2) see the rows of
all processes through `gather`, whose backward (like every differentiable collective) carries each
process's gradient back to the process that made the rows. So after backward, the mean of the processes'
gradients (`average_gradients`) is the gradient of the global batch, and LARS and the EMA, run on every process
from the same gradient, keep the parameters bit-identical across processes.

Hand-written where torch has DistributedDataParallel: the method files read attributes of the model (byol_mhe.py's
sub-networks, msbreg.py's noise generator) that a DDP wrapper hides, and nn.SyncBatchNorm refuses the CPU, where
the two-process tests run on gloo (GlobalBatchNorm)."""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from support.errors import UserError


DIST_TIMEOUT = datetime.timedelta(hours=2)  # others wait while rank 0 runs the k-NN monitor (NCCL default: 10 min)


def launched_world_size():
    """W before joining the process group: the number of processes torchrun started (its WORLD_SIZE); 1 for a
    plain `python script.py`."""
    return world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def under_torchrun():
    return "WORLD_SIZE" in os.environ


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """Rank 0 alone writes the run folder, metrics.jsonl, checkpoints and progress bars, and evaluates."""
    return rank() == 0


def init_distributed(device):
    """The training device (a resolved torch.device); under torchrun also join the process group (NCCL on CUDA, one
    GPU per process at LOCAL_RANK; gloo on the CPU). Joins once: a group the caller already set up is kept."""
    if not under_torchrun():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} of this machine has no GPU ({torch.cuda.device_count()} visible): "
                            f"start at most that many with torchrun --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT, device_id=device if cuda else None)
    return device


def end_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(x):
    """The rows of x (B, ...) of every process in rank order, (W * B, ...): the global batch, for the batch-wide
    terms. Gradients flow back to each process's own rows (the functional all_gather's backward is a
    reduce-scatter of the contiguous gradient: each process receives the sum over processes of its rows'
    gradients). x in one process.

    torch.distributed._functional_collectives is what torch 2.14 names in place of the deprecated
    torch.distributed.nn.functional (whose calls warn on every step): the same sums, to the same bits."""
    if world_size() == 1:
        return x
    return funcol.all_gather_single(x, 0, dist.group.WORLD)


def _all_reduce_sum(x):
    """The sum over the processes, differentiable: its backward sums each process's gradient back to every one."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def average_gradients(params):
    """Replace each gradient by its mean over the processes: one all_reduce of all gradients flattened together
    (after the last micro-batch only, so accumulation communicates once per optimizer step)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads]).div_(world_size())
    dist.all_reduce(flat)
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view(g.shape))


def process_mean(values):
    """The mean over the processes of a {name: scalar tensor} dict (the logged loss terms), in one all_reduce."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.float() for v in values.values()]).to(_collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).to(next(iter(values.values())).device).unbind()))


def agreed_signal(signum, sync):
    """The stop signal every process acts on. One process: its own. Many: the largest any process received,
    agreed on (one small all_reduce) only where `sync` is true on every process, else None."""
    if world_size() == 1:
        return signum
    if not sync:
        return None
    t = torch.tensor([signum or 0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


class StopAgreement:
    """The step after which every process stops on a signal (SIGTERM, Ctrl-C), soon enough for torchrun's grace.

    One process stops after the step in which its signal arrived. Many must stop after the same step, each
    taking part in the checkpoint's collectives, within the 30 s that torchrun leaves between forwarding a
    SIGTERM to its processes and killing them; each notices the signal at its own point of a step. So after every
    step each process starts an all_reduce (MAX) of its signal number without waiting for it, and reads, after the
    next step, the one it started: every process reads the same value after the same step, so all stop together
    after the step that follows the one in which the first of them received the signal (one step later than a
    single process stops). At an epoch's end they agree at once (rank 0's evaluation has made the others wait).

    What that costs per step, instead of a host synchronisation. gloo: the flag is a CPU tensor, and waiting for an
    all_reduce started a step earlier returns at once (each step's gradient all_reduce keeps the processes within
    a step of each other). NCCL: the flag must live on the GPU. It is written by a kernel (fill_: a tensor made
    from a Python number on the GPU would copy from the host and wait for the device), reduced behind the step's
    kernels, and copied behind that into pinned host memory, marked by an event; one step later the host waits for
    that event alone, i.e. until the GPU has finished the step before, so the host may still run a step ahead of
    the GPU. Reading the flag with .item() on the GPU would also wait for every kernel queued since: for the whole
    current step, a full synchronisation every step."""

    def __init__(self):
        self.signum, self.work = None, None  # the agreed signal; the all_reduce in flight
        if world_size() > 1:
            device = _collective_device()
            self.flag = torch.zeros(1, dtype=torch.long, device=device)
            cuda = device.type == "cuda"
            self.host = torch.zeros(1, dtype=torch.long, pin_memory=True) if cuda else self.flag
            self.copied = torch.cuda.Event() if cuda else None

    def after_step(self, signum):
        """The signal every process stops on after this step, or None; `signum` is this process's (or None).
        Every process calls it after every step."""
        if world_size() == 1:
            return signum
        self.signum = self.signum or self._read()
        if self.signum is None:
            self._start(signum)
        return self.signum

    def at_epoch_end(self, signum):
        """The signal agreed now, at an epoch's end (after rank 0's evaluation): one blocking all_reduce."""
        if world_size() == 1:
            return signum
        self.signum = self.signum or self._read() or agreed_signal(signum, True)
        return self.signum

    def _start(self, signum):
        self.flag.fill_(signum or 0)
        self.work = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.copied is not None:
            self.work.wait()  # NCCL: the stream waits for the all_reduce, the host does not
            self.host.copy_(self.flag, non_blocking=True)
            self.copied.record()

    def _read(self):
        """The result of the all_reduce started after the previous step (None if there is none, or no signal)."""
        if self.work is None:
            return None
        if self.copied is not None:
            self.copied.synchronize()
        else:
            self.work.wait()
        self.work = None
        return int(self.host.item()) or None


def from_rank0(obj):
    """Rank 0's value of a picklable object on every process (e.g. a run folder named after the time)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_model(model):
    """Rank 0's parameters and buffers on every process, as DistributedDataParallel starts (in place)."""
    if world_size() > 1:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:  # not state_dict(): it may hold non-tensor extra state
                dist.broadcast(t, src=0)


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. a dataset download), the others after it has finished."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all processes, what nn.SyncBatchNorm
    does on CUDA, written out for the devices it does not run on (the CPU, gloo). The sums are added up by
    _all_reduce_sum, whose backward sums each process's gradient back to every process."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if world_size() == 1 or not (self.training or self.running_mean is None):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * world_size()
        mean = _all_reduce_sum(x.sum(dims)) / count
        var = _all_reduce_sum((x - mean.view(shape)).pow(2).sum(dims)) / count  # biased: normalises the batch
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * count / (count - 1), m)  # unbiased, as BatchNorm keeps it
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model, device):
    """--sync-bn: every BatchNorm of the model (online and target) normalises over the global batch:
    nn.SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere. In place, keeping the same parameters and buffers, so
    state_dict keys and checkpoints stay those of plain BatchNorm."""
    cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    for parent in list(model.modules()):
        for name, bn in parent.named_children():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, cls):
                new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
                if bn.affine:
                    new.weight, new.bias = bn.weight, bn.bias
                if bn.track_running_stats:
                    new.running_mean, new.running_var = bn.running_mean, bn.running_var
                    new.num_batches_tracked = bn.num_batches_tracked
                setattr(parent, name, new.train(bn.training))
    return model


def check_world(args, world):
    """Each of W processes takes batch / (W x accum) images per micro-batch: W must divide the micro-batch."""
    micro = args.batch_size // args.accum_steps
    if micro % world:
        raise UserError(f"--batch-size {args.batch_size} over --accum-steps {args.accum_steps} gives micro-batches "
                        f"of {micro} images, which {world} processes cannot share equally")
    if world > 1 and args.batchnorm and getattr(args, "sync_bn", None) is False and micro // world < 2:
        raise UserError(f"--no-sync-bn with {world} processes gives each {micro // world} image per micro-batch: "
                        f"BatchNorm needs at least 2 (drop --no-sync-bn, or a larger --batch-size)")


def replicate(model, args):
    """Rank 0's model on every process (as DistributedDataParallel starts), and one line saying how the batch is
    shared."""
    broadcast_model(model)
    if world_size() > 1 and is_main():
        synced = getattr(args, "sync_bn", None) is not False
        print(f"# {world_size()} processes ({dist.get_backend()}): "
              f"{args.batch_size // args.accum_steps // world_size()} images each per micro-batch, BatchNorm over "
              f"{'all processes (--sync-bn)' if synced else 'each process'}")
