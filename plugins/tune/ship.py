"""The chosen point, built again in this process and installed like ``graphopt run`` does: verified artifacts
and ``report.json`` in the output folder (trials keep no files: the same pipeline gives the same bytes)."""
from __future__ import annotations

from pathlib import Path

from graphopt import GraphoptError
from graphopt.emit import write_json_atomic

from .trial import Config, _world


def ship(config: Config, pipeline: str, out: Path) -> list[dict]:
    from graphopt.driver import optimize

    world = _world(config)
    result = optimize(world.model, world.inputs, world.registry, pipeline=pipeline, formats=config.format,
                      out_dir=out, model_spec=config.model, name=config.name, data=world.data,
                      leaf_modules=config.leaf_modules)
    write_json_atomic(out / "report.json", result.report)
    if not result.ok:
        raise GraphoptError(f"the chosen pipeline's artifact did not verify when built again: "
                            f"{'; '.join(p for a in result.artifacts for p in a.problems)}")
    return result.report["artifacts"]
