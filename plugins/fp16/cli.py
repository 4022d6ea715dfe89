"""What fp16 brings to ``graphopt run``: ``--calib DATA.npz``, the ranges its fp32 guard reads."""
from __future__ import annotations

import graphopt


@graphopt.hookimpl
def graphopt_add_options(command: str, parser) -> None:
    if command == "run":
        from graphopt.cli.modelspec import add_calibration_option
        add_calibration_option(parser)


@graphopt.hookimpl
def graphopt_run_data(options) -> dict | None:
    from graphopt.cli.modelspec import calibration_data
    return calibration_data(options)


@graphopt.hookimpl
def graphopt_data_hint(key: str) -> str | None:
    return "pass --calib DATA.npz" if key == "calibration" else None
