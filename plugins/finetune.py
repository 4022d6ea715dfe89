"""finetune: retrain the graph's weights, with the user's training function (``ctx.data["train"]``), or with
``distill=true`` on unlabeled inputs, matching the original model's outputs (knowledge distillation)."""
from __future__ import annotations

import time

import torch
import torch.fx as fx
import torch.nn.functional as F

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassError, PassResult, UsageError
from graphopt.graph import flatten_outputs

OPTIONS = (
    Option("epochs", int, 1, "epochs passed to the training function (distill: passes over the inputs)",
           tune=(1, 2, 4, 8)),
    Option("distill", bool, False, "train to match the original model's outputs on unlabeled inputs "
                                   "(--train-data, else the calibration data) instead of calling --train"),
    Option("temperature", float, 2.0, "distill: softmax temperature of 2-D (logit) outputs; others match by MSE"),
    Option("lr", float, 1e-3, "distill: Adam's learning rate"),
    Option("batch", int, 32, "distill: samples per step"),
)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """KL divergence of softened logits (scaled by T², Hinton et al.) for 2-D outputs, MSE for the others."""
    total = torch.zeros(())
    for s, t in zip(student, teacher):
        if s.dim() == 2 and s.shape[1] > 1:
            total = total + F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1),
                                     reduction="batchmean") * temperature ** 2
        else:
            total = total + F.mse_loss(s, t)
    return total


def distill(gm: fx.GraphModule, teacher: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]],
            options: dict) -> float:
    """Train ``gm`` in place to match ``teacher`` on ``batches`` (seeded: the same inputs give the same weights);
    returns the last epoch's mean loss."""
    inputs = [torch.cat(parts) for parts in zip(*batches)]
    with torch.no_grad():
        targets = [torch.cat(parts) for parts in zip(*(flatten_outputs(teacher(*b)) for b in batches))]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(gm.parameters(), lr=options["lr"])
    n, size, losses = len(inputs[0]), max(1, options["batch"]), []
    for _ in range(options["epochs"]):
        order, losses = torch.randperm(n, generator=generator), []
        for start in range(0, n, size):
            pick = order[start:start + size]
            if len(pick) < 2 and n > 1:   # a batch of one breaks BatchNorm's batch statistics
                continue
            loss = _loss(flatten_outputs(gm(*(x[pick] for x in inputs))), [t[pick] for t in targets],
                         options["temperature"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return sum(losses) / max(1, len(losses))


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Call ``train(gm, epochs=epochs)`` with ``gm`` in train mode; it trains in place and
    returns None, or returns the fx.GraphModule to keep. The result goes back to eval mode."""
    epochs, opts = ctx.options["epochs"], ctx.options
    if epochs < 1:
        raise PassError(f"epochs must be at least 1, got {epochs}")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    start, stats = time.perf_counter(), {"epochs": epochs}
    gm.train()
    if opts["distill"]:
        batches = ctx.data.get("train_inputs") or ctx.data.get("calibration")
        if not batches:
            raise PassError("finetune(distill=true) needs unlabeled inputs: pass --train-data INPUTS.npz "
                            "(or --calib DATA.npz)")
        with torch.enable_grad():
            stats["distill_loss"] = round(distill(gm, ctx.data["original"].module.eval(), batches, opts), 6)
        returned = None
    else:
        train = ctx.data.get("train")
        if train is None:
            raise PassError("finetune needs a training function (--train FILE.py:FN), or distill=true to "
                            "match the original model on unlabeled inputs (--train-data INPUTS.npz)")
        if not callable(train):
            raise PassError(f"the training function is not callable (it is {type(train).__name__})")
        try:
            with torch.enable_grad():
                returned = train(gm, epochs=epochs)
        except Exception as exc:
            raise PassError(f"training function {_name(train)} raised {type(exc).__name__}: {exc}") from exc
        if returned is not None and not isinstance(returned, fx.GraphModule):
            raise PassError(f"training function {_name(train)} returned a {type(returned).__name__}; "
                            f"train the module in place and return None, or return a torch.fx.GraphModule")
    result = (gm if returned is None else returned).eval()
    after = result.state_dict()
    modified = result is not gm or before.keys() != after.keys() or \
        any(not torch.equal(v, after[k]) for k, v in before.items())
    return PassResult(result, modified, {**stats, "seconds": round(time.perf_counter() - start, 3)})


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("finetune", "Retrain the weights: the user's training function (--train FILE.py:FN), or "
                             "distill=true to match the original model on unlabeled inputs (--train-data)",
                 run, Effect.TRAINED, options=OPTIONS)]


@graphopt.hookimpl
def graphopt_add_options(command: str, parser) -> None:
    if command == "run":
        parser.add_argument("--train", metavar="FILE.py:FN", help="training function fn(module, *, epochs) "
                            "for the finetune pass (path/to/file.py:fn or package.module:fn)")
        parser.add_argument("--train-data", metavar="INPUTS.npz", help="unlabeled inputs for finetune(distill=true) "
                            "(one array per input, as --calib)")


@graphopt.hookimpl
def graphopt_configure_run(options, pipeline: str, registry) -> str | None:
    """A finetune that would call a training function nobody gave fails before any work."""
    from graphopt.pipeline import parse_pipeline

    if not pipeline or getattr(options, "train", None):
        return None
    for item in registry.expand(parse_pipeline(pipeline)).items:
        value = dict(item.options).get("distill", "false")
        if item.name == "finetune" and value.lower() in ("false", "no", "off", "0"):   # bad values: resolve says
            raise UsageError("finetune needs --train FILE.py:FN, or finetune(distill=true) with --train-data "
                             "INPUTS.npz (or --calib) to match the original model on unlabeled inputs")
    return None


@graphopt.hookimpl
def graphopt_run_data(options) -> dict | None:
    data = {}
    if getattr(options, "train", None):
        from graphopt.cli.modelspec import load_train_function
        train = load_train_function(options.train)        # before any work: a bad spec fails at once
        data["train"] = lambda model, inputs: train
    if getattr(options, "train_data", None):
        from graphopt.cli.calibration import load_calibration
        path = options.train_data
        data["train_inputs"] = lambda model, inputs: load_calibration(path, model, inputs)
    return data or None
