"""finetune: the user's training function (``ctx.data["train"]``) retrains the graph's weights."""
from __future__ import annotations

import time

import torch
import torch.fx as fx

import graphopt
from graphopt import Effect, Option, Pass, PassContext, PassError, PassResult


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Call ``train(gm, epochs=epochs)`` with ``gm`` in train mode; it trains in place and
    returns None, or returns the fx.GraphModule to keep. The result goes back to eval mode."""
    train, epochs = ctx.data["train"], ctx.options["epochs"]
    if epochs < 1:
        raise PassError(f"epochs must be at least 1, got {epochs}")
    if not callable(train):
        raise PassError(f"the training function is not callable (it is {type(train).__name__})")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    start = time.perf_counter()
    gm.train()
    try:
        with torch.enable_grad():
            returned = train(gm, epochs=epochs)
    except Exception as exc:
        raise PassError(f"training function {_name(train)} raised {type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - start
    if returned is not None and not isinstance(returned, fx.GraphModule):
        raise PassError(f"training function {_name(train)} returned a {type(returned).__name__}; "
                        f"train the module in place and return None, or return a torch.fx.GraphModule")
    result = (gm if returned is None else returned).eval()
    after = result.state_dict()
    modified = result is not gm or before.keys() != after.keys() or \
        any(not torch.equal(v, after[k]) for k, v in before.items())
    return PassResult(result, modified, {"epochs": epochs, "seconds": round(seconds, 3)})


@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("finetune", "Retrain the weights with the user's training function (data['train'], "
                             "--train FILE.py:FN)", run, Effect.TRAINED,
                 options=(Option("epochs", int, 1, "epochs passed to the training function"),),
                 needs=("train",))]


@graphopt.hookimpl
def graphopt_add_options(command: str, parser) -> None:
    if command == "run":
        parser.add_argument("--train", metavar="FILE.py:FN", help="training function fn(module, *, epochs) "
                            "for the finetune pass (path/to/file.py:fn or package.module:fn)")


@graphopt.hookimpl
def graphopt_run_data(options) -> dict | None:
    if not getattr(options, "train", None):
        return None
    from graphopt.cli.modelspec import load_train_function
    train = load_train_function(options.train)        # before any work: a bad spec fails at once
    return {"train": lambda model, inputs: train}


@graphopt.hookimpl
def graphopt_data_hint(key: str) -> str | None:
    return "pass --train FILE.py:FN" if key == "train" else None
