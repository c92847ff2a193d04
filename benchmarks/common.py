"""Shared machinery of the paper-reproduction benchmarks (sine, mnist1d, digits).

Many runs of one architecture are trained at once: their parameters are stacked
(``torch.func.stack_module_state``) and one ``vmap`` of ``grad_and_value(functional_call)`` gives
every run's gradient in a single call. Each run keeps its own data order, learning-rate schedule,
momentum and gate noise. The merge itself always goes through the compiler: ``graphmerge.widen`` ->
``graphmerge.add_gates`` -> (batched gate phase) -> ``graphmerge.compress`` -> (batched
fine-tuning). The batched gate phase is the library's: every run's gates draw through the gated
student's own forward (``hard_concrete_sample``) on uniforms passed in per run
(``GatedStudent.gate_noise_name``), and after every step each run's log-alphas move as
``graphmerge.GatePhase`` moves them (budget ramp, projection, decision), through the gated
student's functional ``projected_log_alpha`` / ``decided_log_alpha``.

``run_protocol`` runs every strategy of the paper's Table 1 plus our baselines at one epoch budget;
the three scripts only supply the model, the data and the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad_and_value, stack_module_state, vmap  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # appended: benchmarks/mnist1d.py must not shadow the package

import compare  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.align import rebasin_average  # noqa: E402
from graphmerge.alternatives import magnitude_scores, random_scores, weight_average  # noqa: E402
from graphmerge.recipe import MergeSettings  # noqa: E402
from graphmerge.training import cross_entropy, lambda_schedule  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMPORTED = time.perf_counter()  # the scripts import this module first: their wall time starts about here


# --- stacks of models -----------------------------------------------------------------------------

@dataclass
class Stack:
    """M models of one architecture as stacked tensors (leading dim M) around one template.

    ``shared`` holds non-persistent buffers (the gate index maps), identical in every model and
    passed un-batched so that ``vmap`` sees an ordinary index.
    """

    template: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, modules: Sequence[nn.Module]) -> Stack:
        params, all_buffers = stack_module_state(list(modules))
        persistent = set(modules[0].state_dict())
        buffers = {k: v for k, v in all_buffers.items() if k in persistent}
        shared = {k: v[0] for k, v in all_buffers.items() if k not in persistent}
        params = {k: v.detach() for k, v in params.items()}
        return cls(copy.deepcopy(modules[0]), params, buffers, shared)

    @classmethod
    def cat(cls, stacks: Sequence[Stack]) -> Stack:
        """The models of ``stacks`` one after the other in one stack (no momentum)."""
        join = lambda key: {k: torch.cat([getattr(s, key)[k] for s in stacks]) for k in getattr(stacks[0], key)}  # noqa: E731
        return cls(stacks[0].template, join("params"), join("buffers"), stacks[0].shared)

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def module(self, i: int) -> nn.Module:
        """Run ``i`` as an ordinary module (a deep copy of the template with its tensors)."""
        module = copy.deepcopy(self.template)
        state = {k: v[i].clone() for k, v in {**self.params, **self.buffers}.items()}
        module.load_state_dict(state, strict=False)
        return module

    def select(self, index: Sequence[int]) -> Stack:
        idx = torch.as_tensor(list(index), dtype=torch.long)
        pick = lambda d: {k: v[idx].clone() for k, v in d.items()}  # noqa: E731
        return Stack(self.template, pick(self.params), pick(self.buffers), self.shared, pick(self.momentum))


class WithGateLoss(nn.Module):
    """A gated student whose forward also returns its gate loss, so one functional call gives both."""

    def __init__(self, gated: nn.Module):
        super().__init__()
        self.gated = gated

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gated(x), self.gated.gate_loss()


def _call(stack: Stack, params: dict, buffers: dict, x: torch.Tensor) -> Any:
    return functional_call(stack.template, ({**params, **buffers, **stack.shared}), (x,))


def _call_traceable(stack: Stack, params: dict, buffers: dict, x: torch.Tensor) -> Any:
    """``_call`` as ``torch.compile`` traces it in one graph: ``functional_call``'s own entry check
    (``torch.jit.is_tracing``) breaks the graph for a GraphModule template such as a gated student,
    and a graph break inside ``vmap`` sends the whole step back to eager."""
    with torch.nn.utils.stateless._reparametrize_module(stack.template, {**params, **buffers, **stack.shared}):
        return stack.template(x)


@torch.no_grad()
def predict(stack: Stack, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Eval-mode outputs of every model on the same inputs: (M, n, ...)."""
    stack.template.eval()

    def one(params, buffers, xb):
        out = _call(stack, params, buffers, xb)
        return out[0] if isinstance(out, tuple) else out

    fn = vmap(one, in_dims=(0, 0, None))
    return torch.cat([fn(stack.params, stack.buffers, x[s:s + batch_size]) for s in range(0, len(x), batch_size)], 1)


# --- batched training -----------------------------------------------------------------------------

def task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """MSE for "regression", cross-entropy for "classification", and for "lm" cross-entropy over
    every position of (B, T, V) logits against (B, T) targets."""
    if task == "lm":
        return cross_entropy
    return F.mse_loss if task == "regression" else F.cross_entropy


def step_lr(base: float, milestones: Sequence[int], epoch: int) -> torch.Tensor:
    """Per model: ``base`` divided by 10 from its own milestone on (a MultiStepLR with one step)."""
    m = torch.as_tensor(list(milestones))
    return torch.where(epoch >= m, base / 10, base).to(torch.float32)


@dataclass
class Phase:
    """One batched training phase: epochs [start, stop) with per-model learning rates."""

    start: int
    stop: int
    batch_size: int
    lr: Callable[[int], torch.Tensor]  # epoch -> (M,) learning rates of the weights
    gate_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    aux: Callable[[int], float] | None = None  # epoch -> λ (gate phase only)
    seed: int = 0
    on_epoch_end: Callable[[int, Stack], None] | None = None
    # (the stacked params, the fraction of the phase done, as the recipe counts it) after every update,
    # in place, eagerly in every mode (the gate phase's schedule: ``gate_phase``)
    after_update: Callable[[dict, float], None] | None = None
    noise: str | None = None  # a gated template's uniforms: "aten" (torch.rand, every model its own
    # generator: ``gate_noise_seed``) or "hash" (``hashed_uniform``); None: "hash" in mode "compile", else "aten"


MODES = ("vmap", "loop", "compile")


def train(stack: Stack, x: torch.Tensor, y: torch.Tensor, task: str, phase: Phase, mode: str = "vmap") -> Stack:
    """SGD with momentum (PyTorch's convention) on every model of ``stack`` at once, in place.

    Every model draws its own shuffle each epoch; the last batch may be short, as with a
    DataLoader. A gated template (``WithGateLoss``) adds λ·gate_loss; gates get ``gate_lr``
    and no weight decay. ``mode="vmap"`` computes all models' gradients in one batched call;
    ``mode="loop"`` calls the same functional gradient once per model (on this CPU faster for
    1-D convolutions with BatchNorm, whose batched kernels vmap runs slowly); the update step
    and everything else are shared. ``mode="compile"`` is ``"vmap"`` with the batch gather, the
    gradient and the SGD update of a step compiled into one graph (``torch.compile``, Inductor:
    one fused C++ loop per model for the sine MLP); the same arithmetic up to the order of float
    sums. ``phase.after_update`` runs after the update, eagerly.

    A gated template's gates draw through the library's own training forward on uniforms given
    per model (``GatedStudent.gate_noise_name``): ``noise="aten"`` draws them with ``torch.rand``
    from every model's own generator, seeded ``gate_noise_seed(phase.seed, model)``, so a model
    draws what the library's gate forward draws after ``torch.manual_seed`` of that seed, whatever
    the stack; ``noise="hash"`` (the default of mode "compile") computes them from a counter-based
    hash of (phase seed, step, model, position) inside the step (fused into the compiled step,
    where aten's generator alone took 40 % of a sine gate step; see ``hashed_uniform``).

    Every model's data order is its own ``torch.randperm`` per epoch, from one generator seeded
    with ``phase.seed`` (one permutation per model: arg-sorting uniforms cost 38 % of a from-scratch
    sine epoch).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    noise = phase.noise or ("hash" if mode == "compile" else "aten")
    if noise not in ("aten", "hash"):
        raise ValueError(f"noise must be 'aten' or 'hash', got {noise!r}")
    loss_fn = task_loss(task)
    gated = isinstance(stack.template, WithGateLoss)
    noise_name = f"gated.{stack.template.gated.gate_noise_name}" if gated else ""
    gate_count = stack.template.gated.flat_log_alpha().numel() if gated else 0

    call = _call_traceable if mode == "compile" else _call

    def objective(params, buffers, xb, yb, lam, draw):
        if gated:  # draw: this model's uniforms (noise "aten") or its hash key ("hash")
            uniform = hashed_uniform(draw, (xb.shape[0], gate_count)) if noise == "hash" else draw
            out = call(stack, params, {**buffers, noise_name: uniform}, xb)
            return loss_fn(out[0], yb) + lam * out[1]
        return loss_fn(call(stack, params, buffers, xb), yb)

    grad = grad_and_value(objective)
    step = _looped(grad, stack.size) if mode == "loop" else vmap(
        grad, in_dims=(0, 0, 0, 0, None, 0 if gated else None), randomness="different")
    names = list(stack.params)
    gate_names = {f"gated.{name}" for name in stack.template.gated.gate_parameter_names()} if gated else set()
    is_gate = [k in gate_names for k in names]

    def update(params: dict, momentum: dict, buffers: dict, idx: torch.Tensor, lam: Any, lr_w: torch.Tensor,
               draw: torch.Tensor | None) -> None:
        grads, _ = step(params, buffers, x[idx], y[idx], lam, draw)
        _sgd(params, momentum, names, is_gate, grads, lr_w, phase)

    if mode == "compile":
        update = _compiled(update)
    if not stack.momentum:
        stack.momentum = {k: torch.zeros_like(v) for k, v in stack.params.items()}
    generator = torch.Generator().manual_seed(phase.seed)
    torch.manual_seed(phase.seed)
    n, m = len(x), stack.size
    noise_generators = [torch.Generator().manual_seed(gate_noise_seed(phase.seed, i)) for i in range(m)]
    stack.template.train()
    per_epoch, length = math.ceil(n / phase.batch_size), phase.stop - phase.start
    for epoch in range(phase.start, phase.stop):
        lam = phase.aux(epoch) if phase.aux else 0.0
        if mode == "compile":  # a tensor: a Python float would be baked into the graph, one compile per λ
            lam = torch.tensor(lam, dtype=torch.float32)
        lr_w = phase.lr(epoch)
        order = epoch_orders(generator, m, n)
        # After the first epoch every input the step takes (a full and the short last batch) has
        # been compiled and nothing about them changes but values: Dynamo's guard checks (0.35 ms
        # a step, a fifth of a from-scratch sine step) then only pick between compiled graphs.
        warm = mode == "compile" and epoch > phase.start
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if warm else contextlib.nullcontext():
            for k, s in enumerate(range(0, n, phase.batch_size)):
                idx = order[:, s:s + phase.batch_size]
                draw = None
                if gated and noise == "hash":
                    draw = gate_noise_keys(phase.seed, (epoch - phase.start) * per_epoch + k, m)
                elif gated:
                    draw = torch.stack([torch.rand(idx.shape[1], gate_count, generator=g) for g in noise_generators])
                update(stack.params, stack.momentum, stack.buffers, idx, lam, lr_w, draw)
                if phase.after_update:  # the fraction done as the recipe's fit counts it
                    done = epoch - phase.start + (k + 1) / per_epoch
                    phase.after_update(stack.params, min(done, epoch - phase.start + 1) / length)
        if phase.on_epoch_end:
            phase.on_epoch_end(epoch, stack)
    return stack


def _compiled(update: Callable) -> Callable:
    """``update`` compiled once for every stack size and batch length: the models' dimension and
    the batch's are marked dynamic, so a stack that loses models, or an epoch's short last batch,
    reuses the graph instead of compiling a new one."""
    compiled = torch.compile(update)

    def call(params: dict, momentum: dict, buffers: dict, idx: torch.Tensor, lam: Any, lr_w: torch.Tensor,
             draw: torch.Tensor | None) -> None:
        for t in (*params.values(), *momentum.values(), *buffers.values(), lr_w):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(idx, 0)
        torch._dynamo.maybe_mark_dynamic(idx, 1)
        if draw is not None:
            for dim in range(min(draw.ndim, 2)):  # models; uniforms: and the batch
                torch._dynamo.maybe_mark_dynamic(draw, dim)
        compiled(params, momentum, buffers, idx, lam, lr_w, draw)

    return call


def epoch_orders(generator: torch.Generator, models: int, samples: int) -> torch.Tensor:
    """One epoch's data order for every model: ``(models, samples)``, each row its own permutation."""
    return torch.stack([torch.randperm(samples, generator=generator) for _ in range(models)])


def gate_noise_seed(seed: int, model: int) -> int:
    """The seed of model ``model``'s gate uniforms (noise "aten") in a phase seeded ``seed``."""
    return seed * 1_000_003 + model


def gate_noise_keys(seed: int, step: int, models: int) -> torch.Tensor:
    """Every model's ``hashed_uniform`` key (noise "hash") at step ``step`` of a phase seeded ``seed``:
    (seed, step, model) in bits 40-62, 16-39 and 0-15, so a model's key does not depend on the stack."""
    if not (0 <= seed < 1 << 23 and 0 <= step < 1 << 24 and models <= 1 << 16):
        raise ValueError(f"hash keys hold seeds below 2^23, steps below 2^24 and 2^16 models; got seed {seed}, "
                         f"step {step}, {models} models")
    return torch.arange(models, dtype=torch.int64) + ((seed << 40) + (step << 16))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers (held in int64) whose output bits each depend on every input
    bit: two rounds of xor-shift and multiply (constant 0x45d9f3b, products below 2^59)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def hashed_uniform(key: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """float32 uniforms on (0, 1), the 2^23 odd multiples of 2^-24 (``torch.rand``: 2^24 multiples,
    0 included), one per position of ``shape``: the hash of (``key``, position), where ``key`` is an
    int64 (one per model under ``vmap``).

    A counter-based generator: plain integer ops that ``torch.compile`` fuses into the step that uses
    the values (aten's Mersenne twister runs outside the graph at about 8 ns a number on this CPU,
    Inductor's Philox as a scalar loop); the same values eager, compiled and under ``vmap``."""
    numel = math.prod(shape)
    stream = _mix32(_mix32(key & 0xFFFFFFFF) ^ (key >> 32 & 0xFFFFFFFF))
    bits = _mix32(_mix32(torch.arange(numel, dtype=torch.int64)) ^ stream)
    return ((bits >> 9) * 2 + 1).to(torch.float32).mul(2.0 ** -24).view(*shape)  # odd multiples of 2^-24: exact


def _looped(single: Callable, m: int) -> Callable:
    """The batched step's signature and result, one model at a time (buffers updated in place
    through the views ``v[i]`` of the stacked tensors)."""

    def step(params: dict, buffers: dict, xb: torch.Tensor, yb: torch.Tensor, lam: float,
             draw: torch.Tensor | None) -> tuple[dict, None]:
        grads = [single({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}, xb[i], yb[i],
                        lam, None if draw is None else draw[i])[0] for i in range(m)]
        return {k: torch.stack([g[k] for g in grads]) for k in params}, None

    return step


@torch.no_grad()
def _sgd(params: dict, momentum: dict, names: list[str], is_gate: list[bool], grads: dict, lr_w: torch.Tensor,
         phase: Phase) -> None:
    for name, gate in zip(names, is_gate, strict=True):
        p, g, buf = params[name], grads[name], momentum[name]
        if phase.weight_decay and not gate:
            g = g.add(p, alpha=phase.weight_decay)
        buf.mul_(phase.momentum).add_(g)
        lr = torch.full((p.shape[0],), phase.gate_lr) if gate else lr_w
        p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * buf)


def metric(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per model: test MSE (regression) or accuracy (classification)."""
    if task == "regression":
        return ((out - y.unsqueeze(0)) ** 2).mean(dim=tuple(range(1, out.ndim)))
    return (out.argmax(-1) == y.unsqueeze(0)).float().mean(1)


# --- the protocol ---------------------------------------------------------------------------------

#: graphmerge.merge's settings at their defaults: the gate phase's defaults here are the library's
LIBRARY = MergeSettings()


@dataclass
class Budget:
    """Epochs of each phase. ``unit`` = 1/6 of the total: teachers 2u each, gate u, fine-tune u.
    The gate phase's settings default to ``graphmerge.merge``'s (``LIBRARY``)."""

    unit: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    gate_lr: float = LIBRARY.gate_lr
    lambda0: float = LIBRARY.lambda0
    lambda_growth: float = LIBRARY.lambda_growth
    gate_budget: str = LIBRARY.gate_budget  # "projected" or "penalty" (the paper's λ·L_half)
    budget_ramp: float = LIBRARY.budget_ramp  # projected: the budget falls from 1 to 1/N over this fraction
    budget_direction: str = LIBRARY.budget_direction  # projected: how the log-alphas move onto the budget
    decide_gates: bool = LIBRARY.decide_gates  # projected: past the ramp, drive the gates to the kept channels
    gate_init: float = 1.0  # the log-alphas' initial mean (add_gates' init_mean; 2.40 starts every eval gate at 1)
    drop: float = 5 / 6  # where in a phase the learning rate is divided by 10 (sine: 250 of 300)
    milestones: dict[int, int] = field(default_factory=dict)  # per phase length, overriding ``drop``

    @property
    def teacher(self) -> int:
        return 2 * self.unit

    @property
    def teacher3(self) -> int:
        return round(4 * self.unit / 3)

    @property
    def total(self) -> int:
        return 6 * self.unit

    def milestone(self, epochs: int) -> int:
        """The epoch where the learning rate of a phase of ``epochs`` epochs drops by 10."""
        return self.milestones.get(epochs, round(self.drop * epochs))


@dataclass
class Benchmark:
    name: str
    task: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train, val, test
    budget: Budget
    runs: int
    out: Path
    seed: int = 0
    time_unbatched: bool = True
    mode: str = "vmap"  # how ``train`` runs the models of a stack: "vmap" or "loop"
    noise: str | None = None  # the gate phase's uniforms (``Phase.noise``); None: the mode's default
    compare_budgets: bool = False  # also the student whose gate phase uses the other gate budget
    settings: dict[str, Any] = field(default_factory=dict)  # the task's model and data choices, for the JSON
    log: Callable[[str], None] = print


STRATEGIES = {
    # name: (total epochs from the budget and the equal-compute epochs, description)
    "student": (lambda b, eq: 2 * b.teacher + 2 * b.unit, "paper: 2 teachers, gate phase, compress(gates), fine-tune"),
    "bo3 model": (lambda b, eq: 3 * b.teacher, "paper: best of three models on validation"),
    "one model": (lambda b, eq: b.total, "paper: one model, all epochs"),
    "one model (equal FLOPs)": (lambda b, eq: eq.one, "one model, as many epochs as make its training FLOPs the "
                                                      "student pipeline's"),
    "bo3 (equal FLOPs)": (lambda b, eq: 3 * eq.bo3, "three models whose training FLOPs add up to the student "
                                                    "pipeline's, best on validation"),
    "student N=3": (lambda b, eq: 3 * b.teacher3 + 2 * b.unit, "3 teachers (4u/3 each), gate target 1/3, fine-tune"),
    "ensemble (2x cost)": (lambda b, eq: 2 * b.teacher, "mean of the two teachers' outputs: 2x inference"),
    "weight avg + BN": (lambda b, eq: 2 * b.teacher + b.unit, "average teachers, re-estimate BN, fine-tune"),
    "re-basin avg + BN": (lambda b, eq: 2 * b.teacher + b.unit, "weight matching on coupling groups, average, BN, ft"),
    "magnitude select": (lambda b, eq: 2 * b.teacher + b.unit, "big student, L2 channel selection, fine-tune"),
    "random select": (lambda b, eq: 2 * b.teacher + b.unit, "big student, random channel selection, fine-tune"),
    "teacher A (teacher:0)": (lambda b, eq: 2 * b.teacher + b.unit, "big student, keep teacher 0's channels, ft"),
    "magnitude after gate phase": (lambda b, eq: 2 * b.teacher + 2 * b.unit,
                                   "gate-trained big student, L2 selection (not gates), fine-tune"),
}
FINETUNED = ["student", "student N=3", "weight avg + BN", "re-basin avg + BN", "magnitude select", "random select",
             "teacher A (teacher:0)", "magnitude after gate phase"]
# The merges that go through the learned gate phase; the best of them on validation is also
# compared with every baseline.
STUDENT_VARIANTS = ["student", "student N=3", "magnitude after gate phase"]
BASELINES = [name for name in STRATEGIES if name not in STUDENT_VARIANTS]


# --- cost: FLOPs and wall-clock --------------------------------------------------------------------

def flops_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, backward: bool = True) -> float:
    """FLOPs per sample of one training step (forward, loss, backward) of ``model`` on the batch
    ``(x, y)``, or of one eval-mode forward (``backward=False``), as ``FlopCounterMode`` counts them:
    matmuls and convolutions, in train mode (gate noise drawn) for a training step. A copy of
    ``model`` is used, so its gradients and statistics are untouched."""
    model = copy.deepcopy(model)
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter:
        if backward:
            out = model.train()(x)
            task_loss(task)(out[0] if isinstance(out, tuple) else out, y).backward()
        else:
            with torch.no_grad():
                model.eval()(x)
    return counter.get_total_flops() / len(x)


@dataclass
class Costs:
    """Counted FLOPs per sample (``flops_per_sample`` on one batch of the benchmark's batch size) of
    every model a strategy trains, and the sample counts they are scaled by."""

    small: float  # a teacher / student / one model: forward + backward
    gated2: float  # the big gated student of 2 teachers: forward + backward
    gated3: float  # of 3 teachers
    forward: float  # a small model's eval forward (bo3's validation pick, BatchNorm re-estimation)
    n_train: int
    n_val: int
    n_bn: int  # BatchNorm re-estimation (0 for a model without BatchNorm: nothing is run)

    def train(self, per_sample: float, epochs: int) -> float:
        """FLOPs of ``epochs`` epochs over the training set (samples x epochs x per-sample FLOPs)."""
        return per_sample * self.n_train * epochs


@dataclass
class EqualCompute:
    """Epochs of the equal-FLOPs baselines: the one model, and each of bo3's three models."""

    one: int
    bo3: int


def measure_costs(bench: Benchmark) -> Costs:
    """Count the FLOPs per sample of a small model and of the gated big students of 2 and 3 freshly
    initialised models (FLOPs do not depend on the weights), on the first training batch."""
    x, y = bench.data["train"]
    xb, yb = x[:bench.budget.batch_size], y[:bench.budget.batch_size]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        small = [bench.build() for _ in range(3)]
        inputs = bench.example_inputs()
        gated = [graphmerge.add_gates(graphmerge.widen([m.eval() for m in small[:n]], inputs)) for n in (2, 3)]
    task = bench.task
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small[0].modules())
    return Costs(small=flops_per_sample(small[0], xb, yb, task), gated2=flops_per_sample(gated[0], xb, yb, task),
                 gated3=flops_per_sample(gated[1], xb, yb, task), forward=flops_per_sample(small[0], xb, yb, task,
                                                                                           backward=False),
                 n_train=len(x), n_val=len(bench.data["val"][0]), n_bn=min(len(x), BN_SAMPLES) if has_bn else 0)


def student_flops(b: Budget, c: Costs) -> float:
    """Training FLOPs of the student's whole pipeline: two teachers, the gate phase, fine-tuning."""
    return 2 * c.train(c.small, b.teacher) + c.train(c.gated2, b.unit) + c.train(c.small, b.unit)


def equal_compute(b: Budget, c: Costs) -> EqualCompute:
    """The epochs (rounded to whole epochs) at which one model, or each of three, trains the
    student pipeline's FLOPs."""
    epoch = c.train(c.small, 1)
    total = student_flops(b, c)
    return EqualCompute(one=max(1, round(total / epoch)), bo3=max(1, round(total / (3 * epoch))))


def strategy_flops(b: Budget, c: Costs, eq: EqualCompute) -> dict[str, float]:
    """FLOPs of each strategy's whole pipeline per run, teachers included: training steps forward +
    backward, plus forward-only evaluations the pipeline needs (bo3's pick on validation,
    BatchNorm re-estimation). Not counted: the certificates' forwards on a few example inputs,
    weight matching's assignment problems, and test-set evaluation (the same for every strategy)."""
    teachers = 2 * c.train(c.small, b.teacher)
    finetune = c.train(c.small, b.unit)
    pick = 3 * c.n_val * c.forward
    bn = c.n_bn * c.forward
    flops = {
        "student": student_flops(b, c),
        "bo3 model": 3 * c.train(c.small, b.teacher) + pick,
        "one model": c.train(c.small, b.total),
        "one model (equal FLOPs)": c.train(c.small, eq.one),
        "bo3 (equal FLOPs)": 3 * c.train(c.small, eq.bo3) + pick,
        "student N=3": 3 * c.train(c.small, b.teacher3) + c.train(c.gated3, b.unit) + finetune,
        "ensemble (2x cost)": teachers,
        "weight avg + BN": teachers + bn + finetune,
        "re-basin avg + BN": teachers + bn + finetune,
        "magnitude select": teachers + finetune,
        "random select": teachers + finetune,
        "teacher A (teacher:0)": teachers + finetune,
        "magnitude after gate phase": student_flops(b, c),
    }
    return {name: flops[name] for name in STRATEGIES}


WALL_NOTE = ("Seconds per run, attributed: the batched trainer trains many models in one stack, so each "
             "stretch of training (a span of epochs of the from-scratch stack, a gate phase, the fine-tuning "
             "phase) is divided equally among the models in the stack during it; widen, add_gates, compress "
             "and the baselines' merges are timed per run; a strategy's seconds are the sum over the models and "
             "steps of its pipeline, teachers included (teachers shared by several strategies are counted in "
             "full for each). Evaluation is not counted. On a shared CPU: compare ratios, not seconds.")
BN_SAMPLES = 4096  # training samples for BatchNorm re-estimation (weight averaging baselines)


def fresh_models(bench: Benchmark, run: int, count: int, role: int) -> list[nn.Module]:
    """``count`` freshly initialised models, seeded by (run, role, index)."""
    models = []
    for k in range(count):
        torch.manual_seed(bench.seed * 1_000_003 + run * 1009 + role * 101 + k)
        models.append(bench.build())
    return models


def train_from_scratch(bench: Benchmark, roles: dict[str, tuple[int, int, int]]
                       ) -> tuple[dict[str, Stack], dict[str, np.ndarray]]:
    """Every from-scratch model of every run in one stack; ``roles`` maps a name to (seed role,
    models per run, epochs). Models leave the stack when their epochs are done. Returns each
    role's stack (run-major, ``count`` models per run) and its models' attributed seconds
    (``(runs, count)``: every stretch of epochs divided equally among the models training in it)."""
    b, r = bench.budget, bench.runs
    x, y = bench.data["train"]
    models, epochs, index = [], [], {}
    for name, (role, count, ep) in roles.items():
        index[name] = []
        for run in range(r):
            index[name].append(list(range(len(models), len(models) + count)))
            models += fresh_models(bench, run, count, role)
            epochs += [ep] * count
    stack = Stack.of(models)
    epochs_t = torch.as_tensor(epochs)
    milestones = [b.milestone(e) for e in epochs]
    seconds = np.zeros(len(models))
    pieces, order = [], []
    alive = torch.arange(len(models))
    start, t0 = 0, time.perf_counter()
    for stop in sorted(set(epochs)):
        ms = [milestones[i] for i in alive.tolist()]
        phase = Phase(start, stop, b.batch_size, lambda e, ms=ms: step_lr(b.lr, ms, e), weight_decay=b.weight_decay,
                      seed=bench.seed + start)
        t1 = time.perf_counter()
        train(stack, x, y, bench.task, phase, bench.mode)
        seconds[alive.numpy()] += (time.perf_counter() - t1) / len(alive)
        finished = (epochs_t[alive] == stop).nonzero().flatten().tolist()
        keep = (epochs_t[alive] != stop).nonzero().flatten().tolist()
        pieces.append(stack.select(finished))
        order += alive[finished].tolist()
        if keep:
            stack, alive = stack.select(keep), alive[keep]
        start = stop
        bench.log(f"  trained from scratch up to epoch {stop} ({time.perf_counter() - t0:.0f} s)")
    every = Stack.cat(pieces)
    position = {model: k for k, model in enumerate(order)}
    stacks = {name: every.select([position[i] for run in rows for i in run]) for name, rows in index.items()}
    return stacks, {name: seconds[np.asarray(rows)] for name, rows in index.items()}


def best_of_three(task: str, stack: Stack, data: dict) -> tuple[list[float], torch.Tensor]:
    """Per run, the test metric of the model (of each run's three) best on validation, and its index."""
    (xt, yt), (xv, yv) = data["test"], data["val"]
    test = metric(task, predict(stack, xt), yt).view(-1, 3)
    val = metric(task, predict(stack, xv), yv).view(-1, 3)
    pick = val.argmin(1) if task == "regression" else val.argmax(1)
    return test[torch.arange(len(test)), pick].tolist(), pick


def run_protocol(bench: Benchmark) -> tuple[dict[str, Any], nn.Module]:
    """Every strategy at one epoch budget; writes JSON and plots, returns the result and run 0's
    trained gated student (for the task's own plots)."""
    b, r, task = bench.budget, bench.runs, bench.task
    x, y = bench.data["train"]
    higher = task != "regression"
    costs = measure_costs(bench)
    eq = equal_compute(b, costs)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Phase 1: all from-scratch training in one stack: per run 3 teachers (A, B = the student's
    # teachers, C = bo3's third), 3 shorter teachers for N=3, the one-model run, and the
    # equal-FLOPs one model and three models.
    roles = {"abc": (0, 3, b.teacher), "def": (1, 3, b.teacher3), "one": (2, 1, b.total), "one_eq": (3, 1, eq.one),
             "bo3_eq": (4, 3, eq.bo3)}
    pools, seconds = train_from_scratch(bench, roles)
    timings["from_scratch_s"] = time.perf_counter() - t0
    abc = pools["abc"]
    values: dict[str, list[float]] = {}
    pre_ft: dict[str, list[float]] = {}
    xt, yt = bench.data["test"]
    xv, yv = bench.data["val"]
    values["bo3 model"], pick = best_of_three(task, abc, bench.data)
    values["bo3 (equal FLOPs)"], _ = best_of_three(task, pools["bo3_eq"], bench.data)
    values["one model"] = metric(task, predict(pools["one"], xt), yt).tolist()
    values["one model (equal FLOPs)"] = metric(task, predict(pools["one_eq"], xt), yt).tolist()
    teachers = [[abc.module(3 * i + k) for k in range(3)] for i in range(r)]
    teachers3 = [[pools["def"].module(3 * i + k) for k in range(3)] for i in range(r)]
    pred_abc = predict(abc, xt)
    out_ab = pred_abc.view(r, 3, *pred_abc.shape[1:])[:, :2]
    values["ensemble (2x cost)"] = metric(task, out_ab.mean(1), yt).tolist()
    teacher_test = metric(task, pred_abc, yt).view(r, 3)[:, :2].tolist()

    # Phase 2: the gate phases (N=2 and N=3), batched over runs, through the compiler.
    t1 = time.perf_counter()
    gate2, hist2, bigs, time2 = gate_phase(bench, [t[:2] for t in teachers], tag="N=2")
    gate3, hist3, _, time3 = gate_phase(bench, teachers3, tag="N=3")
    histories = {"N=2": hist2, "N=3": hist3}
    strategies = dict(STRATEGIES)
    other = other_budget = None
    if bench.compare_budgets:  # the same teachers' student with the other gate budget, side by side
        other_budget = "penalty" if b.gate_budget == "projected" else "projected"
        other = f"student ({other_budget} budget)"
        strategies[other] = (STRATEGIES["student"][0], f"as student, gate budget '{other_budget}'")
        gate_other, histories[f"N=2 {other_budget}"], _, time_other = gate_phase(
            bench, [t[:2] for t in teachers], tag=f"N=2 {other_budget}", gate_budget=other_budget)
    timings["gate_phases_s"] = time.perf_counter() - t1

    # Phase 3: every merged student of the teachers' class, fine-tuned in one stack.
    t2 = time.perf_counter()
    students, build_s = build_students(bench, teachers, bigs, gate2, gate3)
    if other:
        students[other], build_s[other] = [], []
        for g in gate_other:
            t = time.perf_counter()
            students[other].append(graphmerge.compress(g.eval(), "gates"))
            build_s[other].append(time.perf_counter() - t)
    timings["compress_and_baselines_s"] = time.perf_counter() - t2
    order = list(FINETUNED) + ([other] if other else [])
    ft_stack = Stack.of([students[name][i] for name in order for i in range(r)])
    check_batched_forward(ft_stack, students[order[0]][0], xt[:64])
    before = metric(task, predict(ft_stack, xt), yt).view(len(order), r)
    ms = [b.milestone(b.unit)] * ft_stack.size
    t3 = time.perf_counter()
    train(ft_stack, x, y, task, Phase(0, b.unit, b.batch_size, lambda e: step_lr(b.lr, ms, e),
                                      weight_decay=b.weight_decay, seed=bench.seed + 7), bench.mode)
    timings["finetune_s"] = time.perf_counter() - t3
    after = metric(task, predict(ft_stack, xt), yt).view(len(order), r)
    after_val = metric(task, predict(ft_stack, xv), yv).view(len(order), r)
    for k, name in enumerate(order):
        values[name] = after[k].tolist()
        pre_ft[name] = before[k].tolist()
    timings["total_s"] = time.perf_counter() - t0
    timings["since_import_s"] = time.perf_counter() - IMPORTED  # the script's wall time up to here
    val_means = {name: float(after_val[order.index(name)].mean()) for name in STUDENT_VARIANTS}
    best = (max if higher else min)(STUDENT_VARIANTS, key=val_means.__getitem__)
    wall = attribute_wall(seconds, time2, time3, build_s, timings["finetune_s"] / ft_stack.size)
    if other:
        wall[other] = (seconds["abc"][:, :2].sum(1) + np.asarray(time_other["compile_s"])
                       + time_other["train_per_model_s"] + np.asarray(build_s[other]) + timings["finetune_s"]
                       / ft_stack.size)
    curves = None
    if task == "regression":
        grid = torch.linspace(0, 1, 500).unsqueeze(1)
        curves = {"x": grid.squeeze(1).tolist(),
                  "student": predict(ft_stack.select(range(r)), grid).squeeze(-1).tolist(),
                  "bo3 model": [predict(abc.select([3 * i + int(pick[i])]), grid)[0, :, 0].tolist() for i in range(r)],
                  "one model": predict(pools["one"], grid).squeeze(-1).tolist()}
    flops = strategy_flops(b, costs, eq)
    if other:
        flops[other] = flops["student"]  # the penalty's gate loss adds no matmul
    result = {
        "benchmark": bench.name, "task": task, "runs": r, "higher_is_better": higher, "settings": bench.settings,
        "metric": "test MSE (lower is better)" if task == "regression" else "test accuracy (higher is better)",
        "budget": {"unit": b.unit, "teacher_epochs": b.teacher, "teacher_epochs_N3": b.teacher3,
                   "gate_epochs": b.unit, "finetune_epochs": b.unit, "total": b.total, "lr": b.lr,
                   "batch_size": b.batch_size, "weight_decay": b.weight_decay, "gate_lr": b.gate_lr,
                   "gate_budget": b.gate_budget, "budget_ramp": b.budget_ramp,
                   "budget_direction": b.budget_direction, "decide_gates": b.decide_gates,
                   "lambda0": b.lambda0, "lambda_growth_per_epoch": b.lambda_growth,
                   "equal_flops_one_model_epochs": eq.one, "equal_flops_bo3_epochs_each": eq.bo3},
        "epochs": {name: strategies[name][0](b, eq) for name in strategies},
        "descriptions": {name: strategies[name][1] for name in strategies},
        "values": {name: values[name] for name in strategies}, "before_finetune": pre_ft, "teachers": teacher_test,
        "stats": {name: summary(values[name]) for name in strategies},
        "flops": flops,
        "flops_per_sample": {"small_train": costs.small, "gated_N2_train": costs.gated2,
                             "gated_N3_train": costs.gated3, "small_eval_forward": costs.forward,
                             "samples": {"train": costs.n_train, "val": costs.n_val, "bn_reestimate": costs.n_bn},
                             "note": "torch.utils.flop_counter.FlopCounterMode on one training batch (forward, "
                                     "loss, backward; matmuls and convolutions only), divided by the batch size; "
                                     "a strategy's FLOPs scale these by samples x epochs per model it trains"},
        "wall_s": {name: [float(v) for v in wall[name]] for name in strategies},
        "wall_note": WALL_NOTE,
        "val_student_variants": val_means, "best_student_variant": best,
        "paired": compare.paired_table(values, best, BASELINES + ([other] if other else []), higher),
        "gate_history": histories,
        "teacher_share": teacher_shares(gate2),
        "timings_s": timings,
        "mode": bench.mode,
        "machine": machine(),
    }
    if bench.time_unbatched:
        result["unbatched_estimate"] = unbatched_estimate(bench, teachers[0][:2], gate2[0], eq)
    if curves:  # 4 decimals: the plot needs no more, and the JSON stays small enough to commit
        result["curves"] = {k: np.round(np.asarray(v, dtype=float), 4).tolist() for k, v in curves.items()}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / f"{bench.name}.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    plot_common(result, bench.out, bench.name)
    compare.plot_paired(result, bench.out / f"{bench.name}_paired.png")
    compare.plot_cost(result, bench.out / f"{bench.name}_cost.png")
    return result, gate2[0]


def attribute_wall(seconds: dict[str, np.ndarray], gate2: dict, gate3: dict, build: dict[str, list[float]],
                   finetune: float) -> dict[str, np.ndarray]:
    """Per strategy, per run: the seconds of its pipeline (see ``WALL_NOTE``). ``seconds`` are the
    from-scratch models' (``(runs, count)`` per role), ``gate2``/``gate3`` the gate phases'
    per-run compile seconds and per-model training seconds, ``build`` each merge's per-run
    seconds, ``finetune`` one model's share of the fine-tuning phase."""
    abc = seconds["abc"]
    pair = abc[:, :2].sum(1)
    gated2 = np.asarray(gate2["compile_s"]) + gate2["train_per_model_s"]
    gated3 = np.asarray(gate3["compile_s"]) + gate3["train_per_model_s"]
    big = np.asarray(gate2["widen_s"])
    upstream = {"student": pair + gated2, "magnitude after gate phase": pair + gated2,
                "student N=3": seconds["def"].sum(1) + gated3, "magnitude select": pair + big,
                "random select": pair + big, "teacher A (teacher:0)": pair + big, "weight avg + BN": pair,
                "re-basin avg + BN": pair}
    wall = {"bo3 model": abc.sum(1), "one model": seconds["one"][:, 0],
            "one model (equal FLOPs)": seconds["one_eq"][:, 0], "bo3 (equal FLOPs)": seconds["bo3_eq"].sum(1),
            "ensemble (2x cost)": pair}
    wall.update({name: upstream[name] + np.asarray(build[name]) + finetune for name in FINETUNED})
    return wall


def gate_phase(bench: Benchmark, teachers: list[list[nn.Module]], tag: str,
               gate_budget: str | None = None) -> tuple[list, dict, list, dict]:
    """widen -> add_gates per run (the compiler), then one batched gate phase over all runs.

    The budget ``mean P[g > 0] = 1/N`` is met as ``gate_budget`` (default: ``bench.budget``'s) says:
    "projected" (graphmerge's default) moves every run's log-alphas after every step as
    ``graphmerge.GatePhase`` moves a gated student's (``gate_schedule``: the budget falling from 1
    to 1/N over the first ``budget_ramp`` of the phase, then, with ``decide_gates``, the decision),
    with no penalty in the loss; "penalty" (the paper) adds ``λ·gate_loss`` with λ grown once per
    epoch. Returns the trained GatedStudents, the per-epoch history of λ or the budget and of every
    group's mean P[g > 0] (mean over runs), the untrained big students, and the seconds (per run:
    widen, widen + add_gates; per model: the batched phase's time / models in the stack).
    """
    b = bench.budget
    inputs = bench.example_inputs()
    bigs, gated, widen_s, compile_s = [], [], [], []
    for i, ts in enumerate(teachers):
        t0 = time.perf_counter()
        bigs.append(graphmerge.widen([t.eval() for t in ts], inputs))
        widen_s.append(time.perf_counter() - t0)
        gated.append(graphmerge.add_gates(bigs[-1], seed=bench.seed * 7919 + i, init_mean=b.gate_init))
        compile_s.append(time.perf_counter() - t0)
    stack = Stack.of([WithGateLoss(g) for g in gated])
    check_batched_forward(stack, WithGateLoss(gated[0]), bench.data["test"][0][:64])
    gate_budget = gate_budget or b.gate_budget
    projected = gate_budget == "projected"
    if gate_budget not in ("projected", "penalty"):
        raise ValueError(f"gate_budget must be 'projected' or 'penalty', got {gate_budget!r}")
    lam = lambda_schedule("quadratic", b.lambda0, b.lambda_growth)
    x, y = bench.data["train"]
    schedule = graphmerge.GatePhase(gated[0], b.unit * math.ceil(len(x) / b.batch_size), budget=gate_budget,
                                    ramp=b.budget_ramp, direction=b.budget_direction, decide=b.decide_gates,
                                    epochs=b.unit, lambda_at=lam)
    names = [f"gated.{name}" for name in gated[0].gate_parameter_names()]
    groups, open_shift = gated[0].gates.group_ids, gated[0].gates.open_shift
    history: dict[str, Any] = {"budget" if projected else "lambda": [], "open": {str(g): [] for g in groups}}
    xv, yv = bench.data["val"]
    # each run's validation metric with eval gates: before the phase (the big student), then per epoch
    history["val"] = [metric(bench.task, predict(stack, xv), yv).tolist()]

    def record(epoch: int, st: Stack) -> None:
        history["val"].append(metric(bench.task, predict(st, xv), yv).tolist())
        st.template.train()  # predict left it in eval mode
        if projected:
            history["budget"].append(schedule.fields((epoch + 1) / b.unit)["budget"])
        else:
            history["lambda"].append(lam(epoch))
        for gid, k in zip(groups, names, strict=True):
            history["open"][str(gid)].append(float(torch.sigmoid(st.params[k] - open_shift).mean()))

    t0 = time.perf_counter()
    phase = Phase(0, b.unit, b.batch_size, lambda e: torch.full((stack.size,), b.lr), gate_lr=b.gate_lr,
                  weight_decay=b.weight_decay, aux=None if projected else lam, seed=bench.seed + 3,
                  on_epoch_end=record, after_update=gate_schedule(schedule, names) if projected else None,
                  noise=bench.noise)
    train(stack, x, y, bench.task, phase, bench.mode)
    seconds = time.perf_counter() - t0
    bench.log(f"  gate phase {tag} ({gate_budget}): {b.unit} epochs, {stack.size} runs, {seconds:.0f} s")
    target = 1 / len(teachers[0])
    far = {g: round(v[-1], 2) for g, v in history["open"].items() if abs(v[-1] - target) > 0.1}
    if far:
        fix = "raise --lambda0/--lambda-growth/--gate-lr" if not projected else "check the projection"
        bench.log(f"  WARNING: after the gate phase {tag} groups {far} are far from {target:.2f} open: compression "
                  f"cuts channels the big student still uses; {fix}")
    trained = []
    for i, g in enumerate(gated):
        state = {k[len("gated."):]: v[i] for k, v in {**stack.params, **stack.buffers}.items()}
        g.load_state_dict(state, strict=False)
        trained.append(g)
    times = {"widen_s": widen_s, "compile_s": compile_s, "train_per_model_s": seconds / stack.size}
    return trained, history, bigs, times


def gate_schedule(schedule: graphmerge.GatePhase, names: list[str]) -> Callable[[dict, float], None]:
    """``Phase.after_update`` that moves every stacked model's log-alphas (``params[name]``, ``(models,
    gates)`` each, ``names`` in the order of ``GatedStudent.gate_parameter_names``) where
    ``schedule.advance_to(progress)`` (a ``graphmerge.GatePhase`` under the projected budget) moves
    its gated student's: onto the budget ``budget_target(progress)``, and past the ramp (with
    ``decide``) to the decision of strength ``decision_strength(progress)``, through the student's
    functional ``projected_log_alpha`` / ``decided_log_alpha``, all models at once."""
    student = schedule.gated

    @torch.no_grad()
    def move(params: dict, progress: float) -> None:
        fields = schedule.fields(progress)
        flat = torch.cat([params[k] for k in names], dim=-1)
        if schedule.decide and progress >= schedule.ramp:
            moved = student.decided_log_alpha(flat, fields["budget"], fields["decision"], schedule.direction)
        else:
            moved = student.projected_log_alpha(flat, fields["budget"], schedule.direction)
        if moved is not flat:
            for k, piece in zip(names, moved.split([params[k].shape[-1] for k in names], dim=-1), strict=True):
                params[k].copy_(piece)

    return move


def build_students(bench: Benchmark, teachers: list[list[nn.Module]], bigs: list, gate2: list,
                   gate3: list) -> tuple[dict[str, list[nn.Module]], dict[str, list[float]]]:
    """Every merged student per run, each an instance of the teachers' class, and the seconds each
    took to build (the coupling analysis re-basin needs is counted in every run's re-basin)."""
    x = bench.data["train"][0]
    bn_inputs = x[: min(len(x), BN_SAMPLES)]
    t0 = time.perf_counter()
    groups = graphmerge.analyze(teachers[0][0], bench.example_inputs())
    analyze_s = time.perf_counter() - t0
    out: dict[str, list[nn.Module]] = {name: [] for name in FINETUNED}
    seconds: dict[str, list[float]] = {name: [] for name in FINETUNED}
    for i, (ts, big) in enumerate(zip(teachers, bigs, strict=True)):
        builders = _merges(i, [t.eval() for t in ts[:2]], big, gate2[i], gate3[i], groups, bn_inputs)
        for name in FINETUNED:
            t0 = time.perf_counter()
            out[name].append(builders[name]())
            seconds[name].append(time.perf_counter() - t0 + (analyze_s if name == "re-basin avg + BN" else 0.0))
    return out, seconds


def _merges(run: int, pair: list[nn.Module], big: nn.Module, gated2: nn.Module, gated3: nn.Module, groups: Any,
            bn_inputs: torch.Tensor) -> dict[str, Callable[[], nn.Module]]:
    """How each fine-tuned strategy of one run builds its student."""
    return {
        "student": lambda: graphmerge.compress(gated2.eval(), "gates"),
        "student N=3": lambda: graphmerge.compress(gated3.eval(), "gates"),
        "weight avg + BN": lambda: weight_average(pair, bn_inputs, batch_size=512),
        "re-basin avg + BN": lambda: rebasin_average(pair, groups, bn_inputs, batch_size=512),
        "magnitude select": lambda: graphmerge.compress(big, magnitude_scores(big)),
        "random select": lambda: graphmerge.compress(big, random_scores(big, seed=run)),
        "teacher A (teacher:0)": lambda: graphmerge.compress(big, "teacher:0"),
        "magnitude after gate phase": lambda: graphmerge.compress(gated2, magnitude_scores(gated2)),
    }


def check_batched_forward(stack: Stack, module: nn.Module, x: torch.Tensor) -> None:
    """The batched forward of run 0 must equal that run's own (unbatched) eval forward."""
    module.eval()
    with torch.no_grad():
        ref = module(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = predict(stack, x)[0]
    err = float((got - ref).abs().max())
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), f"batched forward differs from unbatched: {err}"


def teacher_shares(gated: list) -> dict[str, list[list[int]]]:
    """Per group, per run: how many kept channels come from each teacher."""
    shares: dict[str, list[list[int]]] = {}
    for g in gated:
        for gid, counts in g.teacher_share().items():
            shares.setdefault(str(gid), []).append([int(c) for c in counts])
    return shares


# --- timing of the same protocol one model at a time -----------------------------------------------

def unbatched_estimate(bench: Benchmark, pair: list[nn.Module], gated: nn.Module, eq: EqualCompute,
                       steps: int = 60) -> dict:
    """Seconds per step of ordinary one-model training (nn.Module + torch.optim.SGD), measured on
    ``steps`` steps, extrapolated to the protocol's total steps for all runs. An estimate: say so."""
    b = bench.budget
    x, y = bench.data["train"]
    loss_fn = task_loss(bench.task)

    def per_step(model: nn.Module, aux: bool) -> float:
        model = copy.deepcopy(model).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (b.batch_size,))
            loss = loss_fn(model(x[idx]), y[idx])
            if aux:
                loss = loss + 0.1 * model.gate_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    small = per_step(pair[0], False)
    gated_step = per_step(gated, True)
    steps_per_epoch = math.ceil(len(x) / b.batch_size)
    plain_epochs = bench.runs * (3 * b.teacher + 3 * b.teacher3 + b.total + eq.one + 3 * eq.bo3
                                 + len(FINETUNED) * b.unit)
    gate_epochs = bench.runs * 2 * b.unit
    total = steps_per_epoch * (plain_epochs * small + gate_epochs * gated_step)
    return {"small_step_s": small, "gated_step_s": gated_step, "steps_per_epoch": steps_per_epoch,
            "plain_epochs": plain_epochs, "gate_epochs": gate_epochs, "estimated_total_s": total,
            "note": f"measured {steps} steps of each kind, extrapolated (N=3 gate steps counted at the N=2 cost)"}


# --- reporting -------------------------------------------------------------------------------------

def summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"min": float(v.min()), "max": float(v.max()), "median": float(np.median(v)), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def machine() -> dict[str, Any]:
    import os
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


TABLE_COLUMNS = ("strategy", "epochs", "GFLOPs", "wall s", "min", "max", "median", "mean", "std")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per strategy: total epochs, training GFLOPs of its pipeline per run, attributed
    wall seconds per run (mean over runs, see ``WALL_NOTE``), and the metric's statistics."""
    rows = []
    for name, stats in result["stats"].items():
        rows.append([name, str(result["epochs"][name]), f"{result['flops'][name] / 1e9:.3g}",
                     f"{np.mean(result['wall_s'][name]):.3g}",
                     *(f"{stats[k]:.4f}" for k in ("min", "max", "median", "mean", "std"))])
    return rows


def print_table(result: dict[str, Any]) -> None:
    title = f"{result['benchmark']}: {result['metric']}, {result['runs']} runs per strategy"
    compare.print_rich(title, TABLE_COLUMNS, table_rows(result))
    compare.print_rich(*compare.paired_rows(result))


def markdown_table(result: dict[str, Any]) -> str:
    return compare.markdown(TABLE_COLUMNS, table_rows(result))


def plot_common(result: dict[str, Any], out: Path, name: str) -> None:
    """Box plot of every strategy (Fig. 9/11), λ and open fraction per group (Fig. 5), teacher share."""
    names = list(result["values"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    ax.boxplot([result["values"][n] for n in names], vert=False, showmeans=True,
               meanprops={"marker": "x", "markeredgecolor": "black"})
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.set_xlabel(result["metric"])
    ax.set_title(f"{name}: {result['runs']} runs per strategy, equal-budget strategies marked by epochs in JSON")
    fig.tight_layout()
    fig.savefig(out / f"{name}_box.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for tag, hist in result["gate_history"].items():
        if "lambda" in hist:  # penalty: λ per epoch
            axes[0].plot(hist["lambda"], marker=".", label=f"λ ({tag})")
        else:  # projected: the budget, in the units of the open fraction
            axes[1].plot(hist["budget"], color="black", ls="--", lw=0.8, label=f"budget ({tag})")
        for gid, values in hist["open"].items():
            axes[1].plot(values, marker=".", ms=3, label=f"{tag} group {gid}")
        if hist.get("val"):  # per run, per epoch (0: the big student before the phase)
            values = np.asarray(hist["val"])
            lines = axes[2].plot(np.median(values, 1), marker=".", label=f"{tag}: median over runs")
            axes[2].fill_between(range(len(values)), values.min(1), values.max(1), alpha=0.2,
                                 color=lines[0].get_color())
    axes[0].set_xlabel("gate-phase epoch")
    axes[0].set_ylabel("λ (penalty budget)")
    if axes[0].lines:
        axes[0].legend()
    else:
        axes[0].set_title("no λ: the projected budget needs none", fontsize=9)
    axes[2].set_xlabel("gate-phase epoch (0: the big student before it)")
    axes[2].set_ylabel(f"validation {'accuracy' if result['higher_is_better'] else 'MSE'}, eval gates")
    axes[2].set_title("the gated big student through the gate phase (band: min-max over runs)", fontsize=9)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    axes[1].axhline(0.5, color="grey", lw=0.5)
    axes[1].axhline(1 / 3, color="grey", lw=0.5)
    axes[1].set_xlabel("gate-phase epoch")
    axes[1].set_ylabel("mean P[g > 0] (mean over runs)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_gates.png", dpi=110)
    plt.close(fig)


def plot_first_layer(gated: nn.Module, weight_name: str, out: Path, name: str) -> None:
    """The first layer's filters of the big student, kept ones marked by the teacher they come from."""
    _, info = graphmerge.widen_info(gated)
    gid = next(g.id for g in info.groups.widened if any(k[0] == weight_name and k[1] == 0 for k in g.index_maps))
    kept = set(graphmerge.kept_channels(gated)[gid].tolist())
    weight = dict(gated.graph_module.named_parameters())[weight_name].detach()
    width = info.widths[gid]
    filters = weight.reshape(weight.shape[0], -1).numpy()
    fig, axes = plt.subplots(1, info.n_teachers, figsize=(5 * info.n_teachers, 3.5), sharey=True)
    for t, ax in enumerate(np.atleast_1d(axes)):
        for c in range(width):
            k = t * width + c
            style = {"color": f"C{t}", "alpha": 0.9, "lw": 1.2} if k in kept else {"color": "0.8", "alpha": 0.6,
                                                                                   "lw": 0.6}
            ax.plot(filters[k], **style)
        ax.set_title(f"teacher {t}: {sum(1 for c in range(width) if t * width + c in kept)} of {width} kept")
        ax.set_xlabel(f"{weight_name} entries")
    fig.suptitle(f"{name}: first-layer filters of the big student, kept (colour) vs dropped (grey), run 0")
    fig.tight_layout()
    fig.savefig(out / f"{name}_first_layer.png", dpi=110)
    plt.close(fig)


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The scripts' common options; ``extra`` adds a script's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few runs, few epochs: a CI smoke test")
    parser.add_argument("--runs", type=int, default=None, help="runs per strategy (default: the paper's)")
    parser.add_argument("--unit", type=int, default=None, help="1/6 of the epoch budget")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for JSON and plots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small ops: 1 is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda0", type=float, default=None, help="λ at the first gate epoch")
    parser.add_argument("--lambda-growth", type=float, default=None, help="c in λ <- λ + c·√λ per gate epoch")
    parser.add_argument("--gate-lr", type=float, default=None, help="learning rate of the gates' SGD")
    parser.add_argument("--gate-budget", choices=("projected", "penalty"), default=None,
                        help="how the gate phase meets mean P[g>0] = 1/N: 'projected' (graphmerge's default: "
                             "log-alphas shifted onto a budget falling from 1 to 1/N over the first half of the "
                             "phase, after every step, then decided) or 'penalty' (the paper's λ·L_half, λ grown "
                             "per epoch)")
    parser.add_argument("--decide-gates", action=argparse.BooleanOptionalAction, default=None,
                        help="projected budget: past the ramp, drive the gates to the channels compress keeps "
                             "(graphmerge's default: on)")
    parser.add_argument("--budget-direction", choices=("gradient", "uniform"), default=None,
                        help="projected budget: move each group's log-alphas along the mean's gradient "
                             "(default; undecided gates close first) or all by one constant")
    parser.add_argument("--gate-init", type=float, default=None,
                        help="the gates' initial log-alpha mean (add_gates' init_mean, default 1.0: eval gates "
                             "start at 0.78; 2.4 starts them at 1)")
    parser.add_argument("--compare-budgets", action="store_true",
                        help="also merge the same teachers with the other --gate-budget (one more gate phase) and "
                             "report that student beside the others, paired")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="how the runs of a stack train: one vmap call, or a loop over models (default: "
                             "the task's faster one on this CPU)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


# Gate phase of the CNN tasks under --gate-budget penalty (λ0 and its growth play no part in the
# projected budget; the gates' lr 0.5 applies to both): the sine settings (λ0 0.01, gates' lr 0.1)
# are tuned for 47 000 gate steps; in the few hundred steps of MNIST-1D and digits they leave the
# groups far from 1/N open (digits, 2 runs: 0.61/0.83/0.90 for N=2 with `--lambda0 0.01 --gate-lr
# 0.1`), so compression would cut channels still in use. As in ``make demo``, λ starts high and the
# gates get a faster optimiser; every group then ends at 1/N open (`--runs 2`: 0.50/0.50/0.50 for
# N=2, 0.33/0.34/0.34).
CNN_GATES = {"lambda0": 4.0, "lambda_growth": 0.5, "gate_lr": 0.5}


def run_classification(args: argparse.Namespace, name: str, build: Callable[[], nn.Module],
                       example_inputs: Callable[[], tuple], data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int, mode: str, first_layer: str,
                       settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The protocol for a classification task at the CNN settings (unit 15, lr 0.05, weight decay
    5e-4, ``CNN_GATES``), with the command line's overrides; plots the first layer's filters."""
    unit = args.unit or (1 if args.quick else 15)
    budget = Budget(unit=unit, lr=0.05, batch_size=batch_size, weight_decay=5e-4,
                    **{**CNN_GATES, **gate_overrides(args)})
    bench = Benchmark(name=name, task="classification", build=build, example_inputs=example_inputs, data=data,
                      budget=budget, runs=args.runs or (2 if args.quick else 10), out=args.out, seed=args.seed,
                      mode=args.mode or mode, compare_budgets=args.compare_budgets, settings=settings or {})
    result, gated = run_protocol(bench)
    plot_first_layer(gated, first_layer, args.out, name)
    return result


def gate_overrides(args: argparse.Namespace) -> dict[str, float | str | bool]:
    """The gate-phase settings given on the command line, as ``Budget`` keyword arguments."""
    given = {"lambda0": args.lambda0, "lambda_growth": args.lambda_growth, "gate_lr": args.gate_lr,
             "gate_budget": args.gate_budget, "budget_direction": args.budget_direction,
             "decide_gates": args.decide_gates, "gate_init": args.gate_init}
    return {k: v for k, v in given.items() if v is not None}


def report(results: Path = RESULTS) -> str:
    """Markdown tables, budgets and wall times of every benchmark JSON in ``results``."""
    parts = []
    for name in ("sine", "mnist1d", "mnist1d_hard", "digits"):
        path = results / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        b, t = result["budget"], result["timings_s"]
        parts.append(f"### {name}: {result['metric']}, {result['runs']} runs per strategy\n")
        parts.append(f"Budget: unit {b['unit']} epochs (teachers {b['teacher_epochs']}, N=3 teachers "
                     f"{b['teacher_epochs_N3']}, gate {b['gate_epochs']}, fine-tune {b['finetune_epochs']}, total "
                     f"{b['total']}); batch {b['batch_size']}, lr {b['lr']}, weight decay {b['weight_decay']}; "
                     f"gate budget {b['gate_budget']}; equal-FLOPs one model {b['equal_flops_one_model_epochs']} "
                     f"epochs, bo3 {b['equal_flops_bo3_epochs_each']} epochs each.\n")
        parts.append(markdown_table(result) + "\n")
        title, columns, rows = compare.paired_rows(result)
        parts.append(f"{title}:\n\n{compare.markdown(columns, rows)}\n")
        pre = result["before_finetune"]
        parts.append("Before fine-tuning (mean): " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in pre.items()) + "\n")
        teachers = np.asarray(result["teachers"])
        parts.append(f"Teachers A, B (mean over runs): {teachers.mean(0).round(4).tolist()}\n")
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
        parts.append(f"Wall time (all runs of a phase at once, {result.get('mode', 'vmap')}, "
                     f"{result['machine']['torch_threads']} torch thread): {timing}.")
        if "unbatched_estimate" in result:
            u = result["unbatched_estimate"]
            parts.append(f" One model at a time (estimate: {u['note']}): {u['estimated_total_s']:.0f} s "
                         f"({u['small_step_s'] * 1e3:.2f} ms per teacher step, {u['gated_step_s'] * 1e3:.2f} ms per "
                         f"gated step, {u['steps_per_epoch']} steps per epoch).\n")
        shares = result["teacher_share"]
        kept = ", ".join(f"group {g}: {np.mean([c[0] for c in v]):.1f} / {np.mean([c[1] for c in v]):.1f}"
                         for g, v in shares.items())
        parts.append(f"Kept channels from teacher A / B per group (mean over runs): {kept}\n")
        last = {tag: {g: round(v[-1], 3) for g, v in h["open"].items()} for tag, h in result["gate_history"].items()}
        parts.append(f"Mean P[g>0] per group at the end of the gate phase: {last}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    print(report(folder))
