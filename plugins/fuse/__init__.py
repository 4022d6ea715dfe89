"""The fuse family: ``fuse`` is the named pipeline simplify, fold-bn, fold-affine,
merge-linear, fuse-act; each member is a pass of its own plugin (``-p no:NAME`` drops it
everywhere), run and verified one by one."""
from __future__ import annotations

import graphopt
from graphopt import NamedPipeline

# simplify first (constants become buffers that fold-affine can take; no-ops stop hiding
# patterns), then the folds into layer weights, then merging, and activation fusion last:
# a fused module is opaque to the passes before it.
MEMBERS = ("simplify", "fold-bn", "fold-affine", "merge-linear", "fuse-act")


@graphopt.hookimpl
def graphopt_register_pipelines():
    return [NamedPipeline("fuse", "Operator fusion: " + ", ".join(MEMBERS) + ", in that order, each verified",
                          ",".join(MEMBERS), default_order=30)]
