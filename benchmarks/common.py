"""Shared machinery of the paper-reproduction benchmarks (sine, mnist1d, digits).

Many runs of one architecture are trained at once: their parameters are stacked
(``torch.func.stack_module_state``) and one ``vmap`` of ``grad_and_value(functional_call)`` gives
every run's gradient in a single call (``randomness="different"``: every run draws its own gate
noise). Each run keeps its own data order, learning-rate schedule and momentum. The merge itself
always goes through the compiler: ``graphmerge.widen`` -> ``graphmerge.add_gates`` -> (batched gate
phase) -> ``graphmerge.compress`` -> (batched fine-tuning).

``run_protocol`` runs every strategy of the paper's Table 1 plus our baselines at one epoch budget;
the three scripts only supply the model, the data and the budget.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # appended: benchmarks/mnist1d.py must not shadow the package

import baselines  # noqa: E402

import graphmerge  # noqa: E402
from graphmerge.training import lambda_schedule  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


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


def train(stack: Stack, x: torch.Tensor, y: torch.Tensor, task: str, phase: Phase, mode: str = "vmap") -> Stack:
    """SGD with momentum (PyTorch's convention) on every model of ``stack`` at once, in place.

    Every model draws its own shuffle each epoch; the last batch may be short, as with a
    DataLoader. A gated template (``WithGateLoss``) adds λ·gate_loss; gates get ``gate_lr``
    and no weight decay. ``mode="vmap"`` computes all models' gradients in one batched call;
    ``mode="loop"`` calls the same functional gradient once per model (on this CPU faster for
    1-D convolutions with BatchNorm, whose batched kernels vmap runs slowly); the update step
    and everything else are shared.
    """
    loss_fn = task_loss(task)
    gated = isinstance(stack.template, WithGateLoss)

    def objective(params, buffers, xb, yb, lam):
        out = _call(stack, params, buffers, xb)
        if gated:
            return loss_fn(out[0], yb) + lam * out[1]
        return loss_fn(out, yb)

    step = vmap(grad_and_value(objective), in_dims=(0, 0, 0, 0, None), randomness="different")
    if mode == "loop":
        step = _looped(grad_and_value(objective), stack.size)
    elif mode != "vmap":
        raise ValueError(f"mode must be 'vmap' or 'loop', got {mode!r}")
    names = list(stack.params)
    is_gate = [("graphmerge_gates" in k) for k in names]
    if not stack.momentum:
        stack.momentum = {k: torch.zeros_like(v) for k, v in stack.params.items()}
    generator = torch.Generator().manual_seed(phase.seed)
    torch.manual_seed(phase.seed)
    n, m = len(x), stack.size
    stack.template.train()
    for epoch in range(phase.start, phase.stop):
        lam = phase.aux(epoch) if phase.aux else 0.0
        lr_w = phase.lr(epoch)
        order = torch.argsort(torch.rand(m, n, generator=generator), dim=1)
        for s in range(0, n, phase.batch_size):
            idx = order[:, s:s + phase.batch_size]
            grads, _ = step(stack.params, stack.buffers, x[idx], y[idx], lam)
            _sgd(stack, names, is_gate, grads, lr_w, phase)
        if phase.on_epoch_end:
            phase.on_epoch_end(epoch, stack)
    return stack


def _looped(single: Callable, m: int) -> Callable:
    """The batched step's signature and result, one model at a time (buffers updated in place
    through the views ``v[i]`` of the stacked tensors)."""

    def step(params: dict, buffers: dict, xb: torch.Tensor, yb: torch.Tensor, lam: float) -> tuple[dict, None]:
        grads = [single({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}, xb[i], yb[i],
                        lam)[0] for i in range(m)]
        return {k: torch.stack([g[k] for g in grads]) for k in params}, None

    return step


@torch.no_grad()
def _sgd(stack: Stack, names: list[str], is_gate: list[bool], grads: dict, lr_w: torch.Tensor,
         phase: Phase) -> None:
    for name, gate in zip(names, is_gate, strict=True):
        p, g, buf = stack.params[name], grads[name], stack.momentum[name]
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

@dataclass
class Budget:
    """Epochs of each phase. ``unit`` = 1/6 of the total: teachers 2u each, gate u, fine-tune u."""

    unit: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    gate_lr: float = 0.1
    lambda0: float = 0.01
    lambda_growth: float = 0.05
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
    log: Callable[[str], None] = print


STRATEGIES = {
    # name: (total epochs as a function of the budget, description)
    "student": (lambda b: 2 * b.teacher + 2 * b.unit, "paper: 2 teachers, gate phase, compress(gates), fine-tune"),
    "bo3 model": (lambda b: 3 * b.teacher, "paper: best of three models on validation"),
    "one model": (lambda b: b.total, "paper: one model, all epochs"),
    "student N=3": (lambda b: 3 * b.teacher3 + 2 * b.unit, "3 teachers (4u/3 each), gate target 1/3, fine-tune"),
    "ensemble (2x cost)": (lambda b: 2 * b.teacher, "mean of the two teachers' outputs: 2x inference"),
    "weight avg + BN": (lambda b: 2 * b.teacher + b.unit, "average teachers, re-estimate BN, fine-tune"),
    "re-basin avg + BN": (lambda b: 2 * b.teacher + b.unit, "weight matching on coupling groups, average, BN, ft"),
    "magnitude select": (lambda b: 2 * b.teacher + b.unit, "big student, L2 channel selection, fine-tune"),
    "random select": (lambda b: 2 * b.teacher + b.unit, "big student, random channel selection, fine-tune"),
    "teacher A (teacher:0)": (lambda b: 2 * b.teacher + b.unit, "big student, keep teacher 0's channels, ft"),
    "magnitude after gate phase": (lambda b: 2 * b.teacher + 2 * b.unit,
                                   "gate-trained big student, L2 selection (not gates), fine-tune"),
}
FINETUNED = ["student", "student N=3", "weight avg + BN", "re-basin avg + BN", "magnitude select", "random select",
             "teacher A (teacher:0)", "magnitude after gate phase"]


def fresh_models(bench: Benchmark, run: int, count: int, role: int) -> list[nn.Module]:
    """``count`` freshly initialised models, seeded by (run, role, index)."""
    models = []
    for k in range(count):
        torch.manual_seed(bench.seed * 1_000_003 + run * 1009 + role * 101 + k)
        models.append(bench.build())
    return models


def run_protocol(bench: Benchmark) -> tuple[dict[str, Any], nn.Module]:
    """Every strategy at one epoch budget; writes JSON and plots, returns the result and run 0's
    trained gated student (for the task's own plots)."""
    b, r, task = bench.budget, bench.runs, bench.task
    x, y = bench.data["train"]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # Phase 1: all from-scratch training in one stack: per run 3 teachers (A, B = the student's
    # teachers, C = bo3's third), 3 shorter teachers for N=3, and the one-model run.
    roles = [("abc", 0, 3, b.teacher), ("def", 1, 3, b.teacher3), ("one", 2, 1, b.total)]
    models, epochs = [], []
    for _, role, count, ep in roles:
        for run in range(r):
            models += fresh_models(bench, run, count, role)
            epochs += [ep] * count
    stack = Stack.of(models)
    epochs_t = torch.as_tensor(epochs)
    milestones = [b.milestone(e) for e in epochs]
    done: dict[int, Stack] = {}
    alive = torch.arange(len(models))
    start = 0
    for stop in sorted(set(epochs)):
        ms = [milestones[i] for i in alive.tolist()]
        phase = Phase(start, stop, b.batch_size, lambda e, ms=ms: step_lr(b.lr, ms, e), weight_decay=b.weight_decay,
                      seed=bench.seed + start)
        train(stack, x, y, task, phase, bench.mode)
        finished = (epochs_t[alive] == stop).nonzero().flatten().tolist()
        keep = (epochs_t[alive] != stop).nonzero().flatten().tolist()
        done[stop] = stack.select(finished)
        if keep:
            stack, alive = stack.select(keep), alive[keep]
        start = stop
        bench.log(f"  trained from scratch up to epoch {stop} ({time.perf_counter() - t0:.0f} s)")
    timings["from_scratch_s"] = time.perf_counter() - t0
    abc, def_, one = done[b.teacher], done[b.teacher3], done[b.total]
    if b.teacher == b.teacher3:  # tiny quick budgets: both pools end together
        abc, def_ = abc.select(range(3 * r)), abc.select(range(3 * r, 6 * r))
    values: dict[str, list[float]] = {}
    pre_ft: dict[str, list[float]] = {}
    xt, yt = bench.data["test"]
    xv, yv = bench.data["val"]
    test_abc = metric(task, predict(abc, xt), yt).view(r, 3)
    val_abc = metric(task, predict(abc, xv), yv).view(r, 3)
    pick = val_abc.argmin(1) if task == "regression" else val_abc.argmax(1)
    values["bo3 model"] = test_abc[torch.arange(r), pick].tolist()
    values["one model"] = metric(task, predict(one, xt), yt).tolist()
    teachers = [[abc.module(3 * i + k) for k in range(3)] for i in range(r)]
    teachers3 = [[def_.module(3 * i + k) for k in range(3)] for i in range(r)]
    pred_abc = predict(abc, xt)
    out_ab = pred_abc.view(r, 3, *pred_abc.shape[1:])[:, :2]
    values["ensemble (2x cost)"] = metric(task, out_ab.mean(1), yt).tolist()
    teacher_test = test_abc[:, :2].tolist()

    # Phase 2: the gate phases (N=2 and N=3), batched over runs, through the compiler.
    t1 = time.perf_counter()
    gate2, hist2, bigs = gate_phase(bench, [t[:2] for t in teachers], tag="N=2")
    gate3, hist3, _ = gate_phase(bench, teachers3, tag="N=3")
    timings["gate_phases_s"] = time.perf_counter() - t1

    # Phase 3: every merged student of the teachers' class, fine-tuned in one stack.
    t2 = time.perf_counter()
    students = build_students(bench, teachers, bigs, gate2, gate3)
    timings["compress_and_baselines_s"] = time.perf_counter() - t2
    order = list(FINETUNED)
    ft_stack = Stack.of([students[name][i] for name in order for i in range(r)])
    check_batched_forward(ft_stack, students[order[0]][0], xt[:64])
    before = metric(task, predict(ft_stack, xt), yt).view(len(order), r)
    ms = [b.milestone(b.unit)] * ft_stack.size
    t3 = time.perf_counter()
    train(ft_stack, x, y, task, Phase(0, b.unit, b.batch_size, lambda e: step_lr(b.lr, ms, e),
                                      weight_decay=b.weight_decay, seed=bench.seed + 7), bench.mode)
    timings["finetune_s"] = time.perf_counter() - t3
    after = metric(task, predict(ft_stack, xt), yt).view(len(order), r)
    for k, name in enumerate(order):
        values[name] = after[k].tolist()
        pre_ft[name] = before[k].tolist()
    timings["total_s"] = time.perf_counter() - t0
    curves = None
    if task == "regression":
        grid = torch.linspace(0, 1, 500).unsqueeze(1)
        curves = {"x": grid.squeeze(1).tolist(),
                  "student": predict(ft_stack.select(range(r)), grid).squeeze(-1).tolist(),
                  "bo3 model": [predict(abc.select([3 * i + int(pick[i])]), grid)[0, :, 0].tolist() for i in range(r)],
                  "one model": predict(one, grid).squeeze(-1).tolist()}
    result = {
        "benchmark": bench.name, "task": task, "runs": r,
        "metric": "test MSE (lower is better)" if task == "regression" else "test accuracy (higher is better)",
        "budget": {"unit": b.unit, "teacher_epochs": b.teacher, "teacher_epochs_N3": b.teacher3,
                   "gate_epochs": b.unit, "finetune_epochs": b.unit, "total": b.total, "lr": b.lr,
                   "batch_size": b.batch_size, "weight_decay": b.weight_decay, "gate_lr": b.gate_lr,
                   "lambda0": b.lambda0, "lambda_growth_per_epoch": b.lambda_growth},
        "epochs": {name: STRATEGIES[name][0](b) for name in STRATEGIES},
        "descriptions": {name: STRATEGIES[name][1] for name in STRATEGIES},
        "values": {name: values[name] for name in STRATEGIES}, "before_finetune": pre_ft, "teachers": teacher_test,
        "stats": {name: summary(values[name]) for name in STRATEGIES},
        "gate_history": {"N=2": hist2, "N=3": hist3},
        "teacher_share": teacher_shares(gate2),
        "timings_s": timings,
        "mode": bench.mode,
        "machine": machine(),
    }
    if bench.time_unbatched:
        result["unbatched_estimate"] = unbatched_estimate(bench, teachers[0][:2], gate2[0])
    if curves:  # 4 decimals: the plot needs no more, and the JSON stays small enough to commit
        result["curves"] = {k: np.round(np.asarray(v, dtype=float), 4).tolist() for k, v in curves.items()}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / f"{bench.name}.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    plot_common(result, bench.out, bench.name)
    return result, gate2[0]


def gate_phase(bench: Benchmark, teachers: list[list[nn.Module]], tag: str) -> tuple[list, dict, list]:
    """widen -> add_gates per run (the compiler), then one batched gate phase over all runs.

    Returns the trained GatedStudents, the per-epoch history of λ and of every group's mean
    P[g > 0] (mean over runs), and the untrained big students.
    """
    b = bench.budget
    inputs = bench.example_inputs()
    bigs = [graphmerge.widen([t.eval() for t in ts], inputs) for ts in teachers]
    gated = [graphmerge.add_gates(big, seed=bench.seed * 7919 + i) for i, big in enumerate(bigs)]
    stack = Stack.of([WithGateLoss(g) for g in gated])
    check_batched_forward(stack, WithGateLoss(gated[0]), bench.data["test"][0][:64])
    lam = lambda_schedule("quadratic", b.lambda0, b.lambda_growth)
    gates = gated[0].gates
    shift = gates.beta * math.log(-gates.gamma / gates.zeta)
    history: dict[str, Any] = {"lambda": [], "open": {str(g): [] for g in gates.group_ids}}

    def record(epoch: int, st: Stack) -> None:
        history["lambda"].append(lam(epoch))
        for gid in gates.group_ids:
            log_alpha = st.params[f"gated.graph_module.graphmerge_gates.log_alpha.g{gid}"]
            history["open"][str(gid)].append(float(torch.sigmoid(log_alpha - shift).mean()))

    t0 = time.perf_counter()
    phase = Phase(0, b.unit, b.batch_size, lambda e: torch.full((stack.size,), b.lr), gate_lr=b.gate_lr,
                  weight_decay=b.weight_decay, aux=lam, seed=bench.seed + 3, on_epoch_end=record)
    x, y = bench.data["train"]
    train(stack, x, y, bench.task, phase, bench.mode)
    bench.log(f"  gate phase {tag}: {b.unit} epochs, {stack.size} runs, {time.perf_counter() - t0:.0f} s")
    target = 1 / len(teachers[0])
    far = {g: round(v[-1], 2) for g, v in history["open"].items() if abs(v[-1] - target) > 0.1}
    if far:
        bench.log(f"  WARNING: after the gate phase {tag} groups {far} are far from {target:.2f} open: compression "
                  "cuts channels the big student still uses; raise --lambda0/--lambda-growth/--gate-lr")
    trained = []
    for i, g in enumerate(gated):
        state = {k[len("gated."):]: v[i] for k, v in {**stack.params, **stack.buffers}.items()}
        g.load_state_dict(state, strict=False)
        trained.append(g)
    return trained, history, bigs


def build_students(bench: Benchmark, teachers: list[list[nn.Module]], bigs: list, gate2: list,
                   gate3: list) -> dict[str, list[nn.Module]]:
    """Every merged student per run, each an instance of the teachers' class."""
    x = bench.data["train"][0]
    bn_inputs = x[: min(len(x), 4096)]
    groups = graphmerge.analyze(teachers[0][0], bench.example_inputs())
    out: dict[str, list[nn.Module]] = {name: [] for name in FINETUNED}
    for i, (ts, big) in enumerate(zip(teachers, bigs, strict=True)):
        pair = [t.eval() for t in ts[:2]]
        out["student"].append(graphmerge.compress(gate2[i].eval(), "gates"))
        out["student N=3"].append(graphmerge.compress(gate3[i].eval(), "gates"))
        out["weight avg + BN"].append(baselines.reestimate_bn(baselines.average(pair), bn_inputs))
        out["re-basin avg + BN"].append(baselines.reestimate_bn(baselines.rebasin_average(pair, groups), bn_inputs))
        out["magnitude select"].append(graphmerge.compress(big, baselines.magnitude_scores(big)))
        out["random select"].append(graphmerge.compress(big, baselines.random_scores(big, seed=i)))
        out["teacher A (teacher:0)"].append(graphmerge.compress(big, "teacher:0"))
        out["magnitude after gate phase"].append(graphmerge.compress(gate2[i], baselines.magnitude_scores(gate2[i])))
    return out


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

def unbatched_estimate(bench: Benchmark, pair: list[nn.Module], gated: nn.Module, steps: int = 60) -> dict:
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
    plain_epochs = bench.runs * (3 * b.teacher + 3 * b.teacher3 + b.total + len(FINETUNED) * b.unit)
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


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['benchmark']}: {result['metric']}, {result['runs']} runs per strategy")
    for column in ("strategy", "epochs", "min", "max", "median", "mean", "std"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, stats in result["stats"].items():
        table.add_row(name, str(result["epochs"][name]), *(f"{stats[k]:.4f}" for k in ("min", "max", "median", "mean",
                                                                                      "std")))
    Console(width=120).print(table)


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| strategy | epochs | min | max | median | mean | std |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in result["stats"].items():
        cells = " | ".join(f"{s[k]:.4f}" for k in ("min", "max", "median", "mean", "std"))
        lines.append(f"| {name} | {result['epochs'][name]} | {cells} |")
    return "\n".join(lines)


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

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for tag, hist in result["gate_history"].items():
        axes[0].plot(hist["lambda"], label=f"λ ({tag})")
        for gid, values in hist["open"].items():
            axes[1].plot(values, label=f"{tag} group {gid}")
    axes[0].set_xlabel("gate-phase epoch")
    axes[0].set_ylabel("λ")
    axes[0].legend()
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
    from graphmerge.passes.gate import select_channels
    from graphmerge.passes.widen import widen_info

    _, info = widen_info(gated)
    gid = next(g.id for g in info.groups.widened if any(k[0] == weight_name and k[1] == 0 for k in g.index_maps))
    kept = set(select_channels(info, gated.gate_scores())[gid].tolist())
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


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--mode", choices=("vmap", "loop"), default=None,
                        help="how the runs of a stack train: one vmap call, or a loop over models (default: "
                             "the task's faster one on this CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


# Gate phase of the CNN tasks: the sine settings (λ0 0.01, gates' lr 0.1) are tuned for 47 000 gate
# steps; in the few hundred steps of MNIST-1D and digits they leave the groups far from 1/N open
# (digits, 2 runs: 0.61/0.83/0.90 for N=2 with `--lambda0 0.01 --gate-lr 0.1`), so compression would
# cut channels still in use. As in ``make demo``, λ starts high and the gates get a faster
# optimiser; every group then ends at 1/N open (`--runs 2`: 0.50/0.50/0.50 for N=2, 0.33/0.34/0.34).
CNN_GATES = {"lambda0": 4.0, "lambda_growth": 0.5, "gate_lr": 0.5}


def run_classification(args: argparse.Namespace, name: str, build: Callable[[], nn.Module],
                       example_inputs: Callable[[], tuple], data: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       batch_size: int, mode: str, first_layer: str) -> dict[str, Any]:
    """The protocol for a classification task at the CNN settings (unit 15, lr 0.05, weight decay
    5e-4, ``CNN_GATES``), with the command line's overrides; plots the first layer's filters."""
    unit = args.unit or (1 if args.quick else 15)
    budget = Budget(unit=unit, lr=0.05, batch_size=batch_size, weight_decay=5e-4,
                    **{**CNN_GATES, **gate_overrides(args)})
    bench = Benchmark(name=name, task="classification", build=build, example_inputs=example_inputs, data=data,
                      budget=budget, runs=args.runs or (2 if args.quick else 10), out=args.out, seed=args.seed,
                      mode=args.mode or mode)
    result, gated = run_protocol(bench)
    plot_first_layer(gated, first_layer, args.out, name)
    return result


def gate_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The gate-phase settings given on the command line, as ``Budget`` keyword arguments."""
    given = {"lambda0": args.lambda0, "lambda_growth": args.lambda_growth, "gate_lr": args.gate_lr}
    return {k: v for k, v in given.items() if v is not None}


def report(results: Path = RESULTS) -> str:
    """Markdown tables, budgets and wall times of every benchmark JSON in ``results``."""
    parts = []
    for name in ("sine", "mnist1d", "digits"):
        path = results / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        b, t = result["budget"], result["timings_s"]
        parts.append(f"### {name}: {result['metric']}, {result['runs']} runs per strategy\n")
        parts.append(f"Budget: unit {b['unit']} epochs (teachers {b['teacher_epochs']}, N=3 teachers "
                     f"{b['teacher_epochs_N3']}, gate {b['gate_epochs']}, fine-tune {b['finetune_epochs']}, total "
                     f"{b['total']}); batch {b['batch_size']}, lr {b['lr']}, weight decay {b['weight_decay']}.\n")
        parts.append(markdown_table(result) + "\n")
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
