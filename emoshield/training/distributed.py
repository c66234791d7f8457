"""Data-parallel training on torch.distributed (torchrun): gloo on CPU, NCCL on GPU.

We do not wrap the model in DistributedDataParallel: the defense runs extra forward/backward
passes per step (eval-mode attacks on a BatchNorm-folded copy, then the perturbed batches),
and DDP's hooks would all-reduce (and broadcast buffers) on every one of them. Instead each
rank runs the exact single-process step on its shard of the global batch, then one flat
all-reduce averages the gradients of the whole step, weighted by shard size, so the update is
that of the global batch's mean loss. BatchNorm layers in training mode normalise with the
statistics of the whole global batch (a CPU-capable SyncBatchNorm below: torch's own runs on
GPUs only), so a step on N processes computes what one process computes on the global batch,
up to float summation order; running statistics are also averaged at the end of every epoch.
EMOSHIELD_SYNC_BN=0 keeps per-shard batch statistics instead (DDP's default; fewer messages).

Under `torchrun --nproc_per_node N`, `init_distributed()` reads RANK/WORLD_SIZE/LOCAL_RANK
and MASTER_ADDR/PORT from the environment; without them everything is single-process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    sync_batchnorm: bool = True
    leave_group: torch.distributed.ProcessGroup | None = None  # a gloo group whose barrier waits _LEAVE_TIMEOUT (shutdown_distributed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (strided, like DistributedSampler)."""
        return index[self.rank::self.world_size]

    def broadcast_model(self, model: torch.nn.Module) -> None:
        """Every rank starts from rank 0's weights and buffers."""
        import torch.distributed as dist

        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)

    def loss_scale(self, shard_size: int, global_size: int) -> float:
        """Multiply this rank's mean loss by this before backward (and average the gradients):
        then the summed gradients are those of the global batch's mean loss, shards of unequal
        size included, and synced BatchNorm sees one consistent scale on every rank."""
        return shard_size * self.world_size / global_size

    @contextlib.contextmanager
    def synced_batchnorm(self, model: torch.nn.Module):
        """Within this block, BatchNorm layers in training mode use global-batch statistics."""
        swapped = []
        if self.sync_batchnorm:
            for module in model.modules():
                synced = _SYNCED.get(type(module))
                if synced is not None:
                    swapped.append((module, type(module)))
                    module.__class__ = synced
        try:
            yield
        finally:
            for module, cls in swapped:
                module.__class__ = cls

    def average_gradients(self, model: torch.nn.Module, weight: float) -> None:
        """grad <- sum over ranks of weight * grad_r, in one flat all-reduce (weight 1/world after
        loss_scale)."""
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]) * weight
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def average_buffers(self, model: torch.nn.Module) -> None:
        """BatchNorm running means/variances: the mean over ranks (integer counters: rank 0's)."""
        import torch.distributed as dist

        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer.data)
                buffer.data /= self.world_size
            else:
                dist.broadcast(buffer.data, src=0)

    def sum(self, *values: float) -> list[float]:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation over the union of every rank's batch (training mode)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, factor: float):
        import torch.distributed as dist

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # float64 sums, as torch's CPU kernel accumulates: float32 sums lose the variance of
        # nearly constant channels (erased patches, ReLU zeros) and the runs drift apart
        pack = torch.cat([x.sum(dims, dtype=torch.float64),
                          torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)])
        dist.all_reduce(pack)
        count = pack[-1].item()
        mean = (pack[:-1] / count).to(x.dtype)
        centered = x - mean.view(shape)
        var = (centered * centered).sum(dims, dtype=torch.float64)
        dist.all_reduce(var)
        var = (var / count).to(x.dtype)
        if running_mean is not None and factor > 0:
            running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            running_var.mul_(1 - factor).add_(var * count / max(count - 1, 1), alpha=factor)
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.dims, ctx.shape = count, dims, shape
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        import torch.distributed as dist

        xhat, invstd, weight = ctx.saved_tensors
        dims, shape, count = ctx.dims, ctx.shape, ctx.count
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        pack = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(pack)
        all_dy, all_dy_xhat = pack.chunk(2)
        dx = (weight * invstd).view(shape) / count * (count * dy - all_dy.view(shape) - xhat * all_dy_xhat.view(shape))
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


class _SyncedBatchNormMixin:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.affine:
            return super().forward(x)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean if factor else None,
                                            self.running_var, self.eps, factor)


class _SyncedBatchNorm1d(_SyncedBatchNormMixin, nn.BatchNorm1d):
    pass


class _SyncedBatchNorm2d(_SyncedBatchNormMixin, nn.BatchNorm2d):
    pass


_SYNCED = {nn.BatchNorm1d: _SyncedBatchNorm1d, nn.BatchNorm2d: _SyncedBatchNorm2d}

_CONTEXT: DistContext | None = None


_LEAVE_TIMEOUT = timedelta(hours=24)  # how long ranks wait for each other at the end


def init_distributed(device: str = "auto") -> DistContext | None:
    """The process group of a torchrun launch (created once; NCCL when `device` resolves to a
    GPU, else gloo), or None for a single process."""
    global _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if _CONTEXT is None:
        import torch.distributed as dist

        from .devices import resolve_device

        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if resolve_device(device, local_rank).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(resolve_device(device, local_rank))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the local ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        # every rank creates it here, together; its own timeout, as the default group's (gloo 30 min,
        # NCCL 10 min) is shorter than rank 0's evaluation may be while the others wait to leave
        leave_group = dist.new_group(backend="gloo", timeout=_LEAVE_TIMEOUT)
        _CONTEXT = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                               local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=backend,
                               sync_batchnorm=os.environ.get("EMOSHIELD_SYNC_BN", "1") != "0",
                               leave_group=leave_group)
    return _CONTEXT


def shutdown_distributed(together: bool = True) -> None:
    """Leave the process group before the interpreter exits: a gloo group still alive at exit
    can abort the process (SIGABRT, "terminate called without an active exception").

    `together`: first wait until every rank is here. Rank 0 evaluates and writes after the
    others have finished training; a rank that tore down its gloo connections while rank 0
    still worked was seen to abort the same way under load. Pass False after an error: a
    peer may never arrive (torchrun stops the other workers once one fails)."""
    global _CONTEXT
    context, _CONTEXT = _CONTEXT, None
    if context is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                if together:
                    dist.barrier(group=context.leave_group)
            except Exception as error:  # a peer that died or hung: say so in one line, still leave
                print(f"emoshield: warning: rank {context.rank} left without its peers: "
                      f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
            finally:
                dist.destroy_process_group()


def is_main_process() -> bool:
    context = init_distributed()
    return context is None or context.is_main
