"""Training loops, optimisers, schedules, metrics and the DistributedDataParallel plumbing.

One loop (``fit``) serves every phase of the recipe: teacher training, the gate phase (an extra
loss term and two optimisers) and fine-tuning. It is resumable and reproducible: the data order
of epoch ``e`` depends only on ``(seed, e)`` (a ``DistributedSampler`` seeded per epoch, also in
a single process), so a run restarted from the checkpoint of epoch ``e`` replays epoch ``e + 1``
exactly.

Distributed runs need no code change: under ``torchrun`` (``WORLD_SIZE``/``RANK`` set),
``setup_distributed`` joins the process group (gloo on CPU, NCCL on GPU), the model is wrapped in
DDP, every rank gets ``batch_size / world_size`` samples of the same global batch a single process
would see, and metrics are all-reduced. Gradients (the gates' included: they are parameters of the
wrapped module) are averaged, which for a mean loss is the global batch's gradient. So a DDP run
computes what a single-process run computes, up to float summation order, except for random
draws per sample (the gates' noise, dropout: each rank draws its own, see recipe.py) and
BatchNorm (batch statistics per rank).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset, default_collate

from graphmerge.errors import GraphMergeError
from graphmerge.passes.util import eval_mode

__all__ = ["PRECISIONS", "DistContext", "Distillation", "TrainingDiverged", "autocast", "check_precision",
           "cross_entropy", "default_milestones", "distill_term", "evaluate",
           "fit", "kd_kl", "kd_kl_tokens", "lambda_schedule", "resolve_loss", "setup_distributed", "sgd"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingDiverged(GraphMergeError):
    """The loss (or a weight) became NaN or infinite."""


# --- distributed ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly one-process) run."""

    world_size: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (identity in a single process)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _collective_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def setup_distributed(device: str | torch.device = "cpu") -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context.

    On GPU each rank uses ``cuda:LOCAL_RANK``. Calling it twice is harmless.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world_size <= 1:
        return DistContext(device=device)
    rank = int(os.environ.get("RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return DistContext(world_size=world_size, rank=rank, device=device)


def wrap_for_training(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP-wrap ``model`` in a distributed run, so gradients (gates included) are averaged. A model
    sharded by ``graphmerge.sharding`` (FSDP2) is returned as it is: FSDP averages its gradients."""
    if not ctx.distributed or is_fully_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (``graphmerge.sharding.shard`` wraps the root): its forward
    is then a collective that every rank must run the same number of times."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --- losses, optimisers, schedules ---------------------------------------------------------

def resolve_loss(loss: str | LossFn) -> tuple[LossFn, bool]:
    """-> (loss function, whether accuracy is meaningful for it)."""
    if callable(loss):
        return loss, False
    if loss == "cross_entropy":
        return cross_entropy, True
    if loss == "mse":
        return F.mse_loss, False
    if loss == "causal_lm":
        return causal_lm, False
    raise GraphMergeError(f"unknown loss {loss!r}: use 'cross_entropy', 'causal_lm' (next-token prediction from "
                          f"labels = input_ids, the Hugging Face convention), 'mse' or a callable "
                          f"(output, target) -> scalar tensor.")


def causal_lm(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as Hugging Face causal LMs compute it from ``labels``: position t's
    logits predict label t + 1, labels of -100 are ignored, the mean is over the predicted tokens."""
    logits = output[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _class_last(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Sequence logits (B, T, V) against (B, T) targets: the classes are the last dimension.

    (torch's convention for extra dimensions is (B, C, d), so where V == T a (B, T, V) output
    counts as class-last.)"""
    return output.ndim == 3 and target.ndim == 2 and output.shape[:2] == target.shape


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy``; for sequence logits (B, T, V) and targets (B, T), the mean over all
    B·T positions (divide by ln 2 for bits per token)."""
    if _class_last(output, target):
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def _correct(output: torch.Tensor, target: torch.Tensor) -> float:
    """Sum over the batch of each sample's fraction of correct predictions (1 or 0 for a plain
    classifier; the fraction of correct tokens for a sequence)."""
    predicted = output.argmax(dim=-1 if _class_last(output, target) else 1)
    return float((predicted == target).reshape(len(target), -1).float().mean(dim=1).sum())


def kd_kl(output: torch.Tensor, target_output: torch.Tensor, labels: torch.Tensor,
          temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation term for logits: ``KL(softmax(t/T) || softmax(s/T)) · T²``.

    The KL is summed over the class dimension (dim 1, or the last one for sequence logits (B, T, V)
    against (B, T) labels, as in ``cross_entropy``) and averaged over samples and positions, so it
    is on the scale of the cross-entropy; the T² keeps its gradient's scale independent of T.
    """
    dim = -1 if _class_last(output, labels) else 1
    log_student = F.log_softmax(output / temperature, dim=dim)
    log_target = F.log_softmax(target_output / temperature, dim=dim)
    kl = F.kl_div(log_student, log_target, reduction="none", log_target=True).sum(dim=dim)
    return kl.mean() * temperature**2


DistillTerm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def kd_kl_tokens(output: torch.Tensor, target_output: torch.Tensor, labels: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """:func:`kd_kl` for (B, T, V) language-model logits: the KL summed over the vocabulary at each
    position, averaged over the positions whose label is not -100 (padding), times T²."""
    log_student = F.log_softmax(output.float() / temperature, dim=-1)
    log_target = F.log_softmax(target_output.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_target, reduction="none", log_target=True).sum(dim=-1)
    keep = (labels != -100).to(kl.dtype)
    return (kl * keep).sum() / keep.sum().clamp(min=1) * temperature**2


def distill_term(loss: str | LossFn, temperature: float = 1.0, custom: LossFn | None = None) -> DistillTerm:
    """-> ``(student output, target output, labels) -> scalar``, the distillation term for ``loss``.

    ``custom(student_output, target_output)`` wins when given; else cross-entropy distills with
    :func:`kd_kl` at ``temperature`` and mse with the MSE between the two outputs (a temperature
    would cancel out of ``MSE(s/T, t/T) · T²``). A custom task loss has no built-in term.
    """
    if custom is not None:
        return lambda output, target_output, labels: custom(output, target_output)
    loss_fn, _ = resolve_loss(loss)
    if loss_fn is cross_entropy:
        return lambda output, target_output, labels: kd_kl(output, target_output, labels, temperature)
    if loss_fn is causal_lm:  # every position's next-token distribution; padded positions (-100) left out
        return lambda output, target_output, labels: kd_kl_tokens(output, target_output, labels, temperature)
    if loss_fn is F.mse_loss:
        return lambda output, target_output, labels: F.mse_loss(output, target_output)
    raise GraphMergeError("distillation with a custom loss callable needs distill_loss too: a callable "
                          "(student_output, target_output) -> scalar tensor, since graphmerge cannot tell "
                          "whether the outputs are logits or values. The built-in terms are the temperature-"
                          "scaled KL for loss='cross_entropy' or 'causal_lm' and the MSE for loss='mse'.")


@dataclass
class Distillation:
    """An extra loss term of a phase: ``(1 − weight)·task + weight·term(output, target(inputs), labels)``.

    ``target(*inputs)`` gives the output to pull the model towards, computed without gradient (the
    caller puts its models in eval mode). ``fit`` records per epoch the mean term
    (``distill_loss``) and the samples the target ran on over all ranks (``distill_samples``).
    """

    target: Callable[..., torch.Tensor]
    term: DistillTerm
    weight: float

    def __call__(self, batch: Batch, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_output = logits_of(batch.run(self.target))
        return self.term(output, target_output.detach(), labels)


def sgd(params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9,
        weight_decay: float = 0.0) -> torch.optim.SGD:
    """The paper's optimiser: SGD with momentum."""
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


def default_milestones(epochs: int) -> list[int]:
    """Divide the learning rate by 10 at half and three quarters of training (the paper's CIFAR
    and ImageNet recipe); none for runs too short to have distinct milestones."""
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if 0 < m < epochs})


def lambda_schedule(kind: str | Callable[[int], float], lambda0: float = 0.01,
                    growth: float = 0.05) -> Callable[[int], float]:
    """λ for (0-based) epoch ``e``, as a pure function so a resumed run recomputes it.

    The reference code updates λ once per epoch, before the epoch: ``λ ← λ + growth·√λ`` from
    ``λ₀`` ("quadratic": √λ grows linearly). "linear" adds the first such step,
    ``growth·√λ₀``, every epoch; "constant" keeps ``λ₀``; a callable is used as given.
    """
    if callable(kind):
        return kind
    if lambda0 < 0:
        raise GraphMergeError(f"lambda0 must be >= 0, got {lambda0}.")
    if kind == "constant":
        return lambda epoch: lambda0
    if kind == "linear":
        step = growth * math.sqrt(lambda0)
        return lambda epoch: lambda0 + step * (epoch + 1)
    if kind == "quadratic":
        def quadratic(epoch: int) -> float:
            value = lambda0
            for _ in range(epoch + 1):
                value += growth * math.sqrt(value)
            return value
        return quadratic
    raise GraphMergeError(f"unknown lambda schedule {kind!r}: use quadratic, linear, constant or a "
                          f"callable epoch -> lambda.")


# --- data ----------------------------------------------------------------------------------

def epoch_batches(data: Dataset | DataLoader, batch_size: int, *, seed: int, epoch: int,
                  ctx: DistContext, shuffle: bool = True) -> DataLoader:
    """This rank's batches for one epoch, in an order fixed by ``(seed, epoch)``.

    ``batch_size`` is the global batch; each of ``world_size`` ranks takes its share of every
    global batch. A DataLoader contributes its dataset, batch size and collate function;
    graphmerge does the (seeded, resumable, distributed) shuffling itself. An IterableDataset
    loader is used as it is.
    """
    collate = None
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            return data
        batch_size, collate, data = data.batch_size or batch_size, data.collate_fn, data.dataset
    if batch_size % ctx.world_size:
        raise GraphMergeError(f"batch size {batch_size} is not divisible by the {ctx.world_size} "
                              f"processes; choose a multiple of {ctx.world_size}.")
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                 seed=seed)
    sampler.set_epoch(epoch)
    return DataLoader(data, batch_size=batch_size // ctx.world_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed + epoch))


def _eval_shard(data: Dataset | DataLoader, batch_size: int, ctx: DistContext,
                lockstep: bool = False) -> Iterable[tuple[Any, bool]]:
    """Every sample exactly once over all ranks (rank r takes r, r + W, ...), no padding, as
    ``(batch, counted)`` pairs. ``lockstep`` (a sharded model, whose forward is a collective): every
    rank runs as many batches as rank 0, the extra ones a repeat of sample 0, not counted; an
    IterableDataset then runs whole on every rank and counts on rank 0."""
    collate = None
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            if lockstep:
                return ((batch, ctx.is_main) for batch in data)
            return ((batch, True) for batch in data) if ctx.is_main else []
        batch_size, collate, data = data.batch_size or batch_size, data.collate_fn, data.dataset
    everything = data
    if ctx.distributed:
        data = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    batches: Iterable[tuple[Any, bool]] = ((batch, True) for batch in loader)
    missing = math.ceil(math.ceil(len(everything) / ctx.world_size) / batch_size) - len(loader) if lockstep else 0
    if missing > 0:  # collated here, not by a DataLoader, whose iterator would draw from torch's RNG
        filler = (collate or default_collate)([everything[0]])
        batches = itertools.chain(batches, [(filler, False)] * missing)
    return batches


@dataclass
class Batch:
    """One batch split into the model's positional and keyword inputs and the target.

    A batch is ``(inputs, target)`` (inputs a tensor or a tuple of them) or a dict of tensors (a
    Hugging Face batch: ``input_ids``, ``attention_mask``, ``pixel_values``, ...) whose ``labels``
    entry is the target and whose other entries go to the model as keywords. The labels never go
    to the model: the task loss is ``loss(output, labels)``, computed by graphmerge, so that it is
    the same for a teacher and for a big student that averages the teachers' logits.
    """

    args: tuple
    kwargs: dict[str, torch.Tensor]
    target: torch.Tensor

    def __len__(self) -> int:
        return len(self.target)

    def run(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def _to_device(batch: Any, device: torch.device) -> Batch:
    """The batch's inputs and target (see :class:`Batch`), moved to ``device``."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise GraphMergeError(f"a dict batch needs a 'labels' entry (the target of the loss); this one has "
                                  f"{', '.join(map(str, batch))}.")
        loose = [k for k, v in batch.items() if isinstance(v, list | tuple)]
        if loose:
            raise GraphMergeError(f"the data's dict items hold {', '.join(map(str, loose))} as Python lists, which "
                                  f"batch into lists of per-position tensors, not one tensor each. Give tensors: "
                                  f"for a Hugging Face datasets.Dataset pass dataset.with_format('torch').")
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
        return Batch((), kwargs, batch["labels"].to(device))
    inputs, target = batch[0], batch[1]
    inputs = tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
    return Batch(tuple(x.to(device) for x in inputs), {}, target.to(device))


def logits_of(output: Any) -> Any:
    """The tensor a loss reads: a model output's ``logits`` (a Hugging Face ``ModelOutput`` or a dict)."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return output


# --- loops ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, loss: str | LossFn, *,
             batch_size: int = 256, ctx: DistContext | None = None) -> dict[str, float]:
    """Mean loss (and accuracy for cross-entropy) over ``data`` in eval mode, over all ranks."""
    ctx = ctx or DistContext()
    loss_fn, with_accuracy = resolve_loss(loss)
    total_loss = correct = count = 0.0
    with eval_mode(model):
        for batch, counted in _eval_shard(data, batch_size, ctx, lockstep=is_fully_sharded(model)):
            step = _to_device(batch, ctx.device)
            output, target = logits_of(step.run(model)), step.target
            if not counted:
                continue
            n = len(target)
            total_loss += float(loss_fn(output, target)) * n
            if with_accuracy:
                correct += _correct(output, target)
            count += n
    total_loss, correct, count = ctx.sum([total_loss, correct, count])
    if count == 0:
        raise GraphMergeError("the evaluation data set is empty; give it at least one sample.")
    metrics = {"loss": total_loss / count}
    if with_accuracy:
        metrics["acc"] = correct / count
    return metrics


@dataclass
class PhaseConfig:
    """What one training phase needs besides the model and the data."""

    name: str
    epochs: int
    batch_size: int
    seed: int
    optimizers: Mapping[str, torch.optim.Optimizer]
    schedulers: Sequence[Any] = ()  # stepped once per epoch (MultiStepLR)
    step_schedulers: Sequence[Any] = ()  # stepped after every optimiser step (warmup, cosine: graphmerge.optim)
    clip: Mapping[str, float] | None = None  # optimiser name -> max L2 norm of its parameters' gradients
    aux_loss: Callable[[int], torch.Tensor] | None = None  # epoch -> extra term of the loss
    epoch_fields: Callable[[int], dict[str, Any]] | None = None  # epoch -> extra record fields
    after_step: Callable[[float], None] | None = None  # fraction of the phase done -> (after each step)
    distill: Distillation | None = None  # a target to pull the outputs towards (fine-tuning)
    progress: bool = True
    compile: bool = False  # train through torch.compile(model) (the module itself is unchanged)
    precision: str = "fp32"  # "bf16": forward and loss under torch.autocast(bfloat16)


def fit(model: nn.Module, train_data: Dataset | DataLoader, loss: str | LossFn, phase: PhaseConfig, *,
        val_data: Dataset | DataLoader | None = None, start_epoch: int = 0,
        ctx: DistContext | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` for epochs ``start_epoch .. phase.epochs - 1``; one record per epoch.

    ``on_epoch_end(epoch, record)`` runs after the epoch's weights are known to be finite (the
    recipe saves its checkpoint there). A NaN/inf loss or weight raises ``TrainingDiverged``
    naming the phase, epoch and batch before anything is saved, so the last checkpoint stays good.
    """
    ctx = ctx or DistContext()
    loss_fn, _ = resolve_loss(loss)
    check_precision(phase.precision)
    trained = wrap_for_training(model, ctx)
    if phase.compile and phase.epochs > start_epoch:
        # compiled once per phase (and per resumption), on the first step; ``model`` itself stays the
        # plain module, so checkpoints (model.state_dict()) carry no '_orig_mod.' prefix
        trained = torch.compile(trained)
    history = []
    for epoch in range(start_epoch, phase.epochs):
        record: dict[str, Any] = {"phase": phase.name, "epoch": epoch + 1}
        if phase.epoch_fields is not None:
            record.update(phase.epoch_fields(epoch))
        batches = epoch_batches(train_data, phase.batch_size, seed=phase.seed, epoch=epoch, ctx=ctx)
        record.update(_train_one_epoch(trained, batches, loss_fn, phase, epoch, ctx))
        _check_finite_weights(model, phase.name, epoch)
        for scheduler in phase.schedulers:
            scheduler.step()
        if val_data is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_data, loss, ctx=ctx).items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        history.append(record)
    return history


def _train_one_epoch(model: nn.Module, batches: Iterable, loss_fn: LossFn, phase: PhaseConfig,
                     epoch: int, ctx: DistContext) -> dict[str, float]:
    """One pass over ``batches``; returns the sample-weighted mean task loss over all ranks (and, when
    distilling, the mean distillation term and how many samples the target ran on)."""
    model.train()
    total = count = 0.0
    lr = next(iter(phase.optimizers.values())).param_groups[0]["lr"]
    try:
        per_epoch = len(batches)
    except TypeError:  # an IterableDataset: the phase's progress advances by whole epochs
        per_epoch = None
    distilled = 0.0
    for index, batch in enumerate(_progress(batches, phase, epoch, ctx)):
        step = _to_device(batch, ctx.device)
        target = step.target
        with autocast(phase.precision, ctx.device):
            output = logits_of(step.run(model))
            task_loss = loss_fn(output, target)
            loss = task_loss
            if phase.distill is not None:
                distill_loss = phase.distill(step, output, target)
                loss = (1 - phase.distill.weight) * task_loss + phase.distill.weight * distill_loss
                distilled += float(distill_loss.detach()) * len(target)
            loss = loss if phase.aux_loss is None else loss + phase.aux_loss(epoch)
        _check_finite_loss(loss, phase.name, epoch, index, ctx)
        for optimizer in phase.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, max_norm in (phase.clip or {}).items():  # no GradScaler: bf16 autocast needs no unscaling
            group_params = [p for group in phase.optimizers[name].param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(group_params, max_norm)
        for optimizer in phase.optimizers.values():
            optimizer.step()
        for scheduler in phase.step_schedulers:
            scheduler.step()
        if phase.after_step is not None:
            done = epoch + ((index + 1) / per_epoch if per_epoch else 0.0)
            phase.after_step(min(done, epoch + 1) / phase.epochs)
        total += float(task_loss.detach()) * len(target)
        count += len(target)
    if phase.after_step is not None and per_epoch is None:
        phase.after_step((epoch + 1) / phase.epochs)
    total, count, distilled = ctx.sum([total, count, distilled])
    record = {"loss": total / max(count, 1.0), "lr": lr}
    if phase.distill is not None:  # one target forward per training sample, on every rank
        record.update(distill_loss=distilled / max(count, 1.0), distill_samples=int(count))
    return record


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise GraphMergeError(f"unknown precision {precision!r}: use 'fp32' (float32 throughout) or 'bf16' "
                              f"(forward and loss under torch.autocast with bfloat16; weights, gradients and "
                              f"the optimiser stay float32).")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, torch.bfloat16)`` for ``precision="bf16"``; nothing for fp32.
    Autocast runs matrix products and convolutions in bfloat16 and keeps reductions, norms and
    losses in float32; the parameters, their gradients and the optimiser state stay float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(batches: Iterable, phase: PhaseConfig, epoch: int, ctx: DistContext) -> Iterable:
    """A per-epoch tqdm bar on the main rank of an interactive terminal; plain batches otherwise."""
    if not (phase.progress and ctx.is_main and sys.stderr.isatty()):
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"{phase.name} {epoch + 1}/{phase.epochs}", leave=False, unit="batch")


def _check_finite_loss(loss: torch.Tensor, phase: str, epoch: int, batch: int, ctx: DistContext) -> None:
    """Stop before a NaN/inf step; in DDP every rank agrees, so none is left waiting in a collective."""
    bad = 0.0 if bool(torch.isfinite(loss.detach())) else 1.0
    if ctx.distributed:
        bad = ctx.sum([bad])[0]
    if bad:
        raise TrainingDiverged(
            f"training diverged in the {phase} phase at epoch {epoch + 1}, batch {batch + 1}: the loss is "
            f"{float(loss.detach())} (NaN or infinite). Nothing from this epoch was saved; the last good "
            f"checkpoint is kept. Lower the learning rate (or lambda0 for the gate phase) and resume or "
            f"restart.")


def _check_finite_weights(model: nn.Module, phase: str, epoch: int) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TrainingDiverged(
                f"training diverged in the {phase} phase at epoch {epoch + 1}: {name!r} holds NaN or "
                f"infinite values after the epoch's last step. Nothing from this epoch was saved; the last "
                f"good checkpoint is kept. Lower the learning rate and resume or restart.")
