"""What a pass is: a name, typed options, what it needs, its numerical effect and ``run``. A plugin returns
:class:`Pass` objects from ``graphopt_register_passes``; the pass manager is the only thing that runs them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx

from .metrics import Tolerance

if TYPE_CHECKING:
    from .graph import Graph

KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


class Effect(str, Enum):
    """How a pass changes the numbers, which decides how verify-each judges it."""

    EXACT = "exact"            # same function in fp32: outputs within 1e-5 of output scale
    FP16 = "fp16"              # half precision somewhere: within 1e-2, cosine >= 0.999
    INT8 = "int8"              # quantized: cosine >= 0.99 and SQNR >= 14 dB (cosine alone is blind to scale)
    STRUCTURAL = "structural"  # a different function (e.g. pruned): judged against the pass's oracle
    TRAINED = "trained"        # retrained weights: same output count and shapes, all finite

    @property
    def tolerance(self) -> Tolerance:
        return _TOLERANCES[self]


_TOLERANCES = {
    Effect.EXACT: Tolerance(max_rel=1e-5),
    Effect.FP16: Tolerance(max_rel=1e-2, min_cosine=0.999),
    Effect.INT8: Tolerance(min_cosine=0.99, min_sqnr_db=14.0),   # 14 dB: |error| <= 0.2 |reference|
    Effect.STRUCTURAL: Tolerance(max_rel=1e-5),
    Effect.TRAINED: Tolerance(),   # compare() checks count and shapes, violations() finiteness
}

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


@dataclass(frozen=True)
class Option:
    """One typed option of a pass or emitter: ``prune(ratio=0.5)``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple = ()
    tune: tuple = ()       # the values `graphopt tune` tries (evenly spaced numbers: searched as a range)

    def parse(self, text: str) -> Any:
        """The typed value of ``text``; ValueError says what the option takes."""
        try:
            if self.type is bool and text.lower() not in _TRUE | _FALSE:
                raise ValueError
            value: Any = text.lower() in _TRUE if self.type is bool else self.type(text)
        except ValueError:
            kind = self.type.__name__
            raise ValueError(f"{self.name} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {text!r}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {text!r}")
        return value

    def describe(self) -> str:
        default = str(self.default).lower() if isinstance(self.default, bool) else self.default
        return f"{self.name}: {self.type.__name__} = {default}"


@dataclass
class PassResult:
    """What ``run`` returns: the (possibly new) module, whether it changed, and counts."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """Everything a pass may read besides the module: its options, the inputs, shared data."""

    options: dict
    graph: "Graph"
    data: dict = field(default_factory=dict)
    explanations: list[str] = field(default_factory=list)
    scratch: dict = field(default_factory=dict)     # this run of the pass only, e.g. what its oracle reads
    registry: Any = None                            # the plugin Registry: what a pass may collect from hooks
    progress: Callable[[str], None] = lambda text: None   # the run's progress line: ctx.progress("calibrating 3/16")

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.graph.example_inputs

    def explain(self, message: str) -> None:
        """Record why a candidate rewrite was applied or rejected (``--explain PASS``)."""
        self.explanations.append(message)


Oracle = Callable[[fx.GraphModule, fx.GraphModule, PassContext], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Pass:
    """A registered pass. ``run(graph_module, ctx) -> PassResult`` may rewrite in place."""

    name: str
    description: str
    run: Callable[[fx.GraphModule, PassContext], PassResult]
    effect: Effect = Effect.EXACT
    options: tuple[Option, ...] = ()
    needs: tuple[str, ...] = ()          # keys the pass reads from ctx.data, e.g. "calibration"
    oracle: Oracle | None = None          # STRUCTURAL passes: expected outputs of the new graph
    default_order: int | None = None      # position in the default pipeline; None: not in it
    tolerance: Tolerance | None = None    # verify-each tolerance when tighter than its effect's

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def problems(self) -> list[str]:
        """Why this definition is invalid (empty when it is fine)."""
        return [why for bad, why in [
            (not KEBAB.match(self.name), f"pass name {self.name!r} is not kebab-case"),
            (not callable(self.run), f"pass {self.name!r}: run is not callable"),
            (self.effect is Effect.STRUCTURAL and self.oracle is None,
             f"pass {self.name!r} is structural but has no oracle to verify it against"),
            (len({o.name for o in self.options}) != len(self.options), f"pass {self.name!r} declares an option twice"),
        ] if bad]
