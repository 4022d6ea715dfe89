"""Same model, same pipeline, same bytes: run the default `quantize` twice per zoo model, the second time
with the other core kept busy, and compare the artifacts byte for byte.

    unshare -n -- .venv/bin/python bench/determinism.py [--size small|full] [--models resnet,...]
        [--formats onnx,ptl] [--pipeline cleanup,fold-bn,fuse,quantize] [--out bench/DETERMINISM.md]

Each run is its own process (a fresh interpreter, as a user's second run would be); the busy core is a
process spinning in a loop for the length of the second run. A timing-based choice (the old
`prefer=speed`, now `prefer=measure`) could flip a borderline layer under that load; the cost table
cannot.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from sweep import models  # noqa: E402

RUN = """
import hashlib, json, sys, torch
sys.path.insert(0, {tests!r}); sys.path.insert(0, {bench!r})
import graphopt
from sweep import models
build, shape = models({size!r})[{model!r}]
gen = torch.Generator().manual_seed(0)
x = torch.randn(*shape, generator=gen)
calibration = [torch.randn(*shape, generator=gen) for _ in range(16)]
result = graphopt.optimize(build().eval(), (x,), graphopt.load_plugins(), pipeline={pipeline!r},
                           formats={formats!r}, out_dir={out!r}, data={{"calibration": calibration}})
assert result.ok, result.report["artifacts"]
stats = [p["stats"] for p in result.report["passes"] if p["name"] == "quantize"][0]
print(json.dumps({{c.artifact.format: hashlib.sha256(c.artifact.path.read_bytes()).hexdigest()
                  for c in result.artifacts}} | {{"fp32_layers": stats["fp32_layers"]}}))
"""


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _run(args, model: str, out: Path) -> tuple[dict, float]:
    code = RUN.format(tests=str(HERE.parent / "tests"), bench=str(HERE), size=args.size, model=model,
                      pipeline=args.pipeline, formats=args.formats, out=str(out))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("small", "full"))
    parser.add_argument("--models", default="")
    parser.add_argument("--formats", default="onnx,ptl")
    parser.add_argument("--pipeline", default="cleanup,fold-bn,fuse,quantize")
    parser.add_argument("--out", type=Path, default=HERE / "DETERMINISM.md")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else list(models(args.size))
    rows = ["| model | run 1 s | run 2 s (other core busy) | fp32 layers | " +
            " | ".join(f"{f} identical" for f in args.formats.split(",")) + " |",
            "| --- | ---: | ---: | --- | " + " | ".join("---" for _ in args.formats.split(",")) + " |"]
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                first, t1 = _run(args, name, Path(tmp) / "a")
                stop = multiprocessing.Event()
                spinner = multiprocessing.Process(target=_spin, args=(stop,))
                spinner.start()
                try:
                    second, t2 = _run(args, name, Path(tmp) / "b")
                finally:
                    stop.set()
                    spinner.join()
            except RuntimeError as exc:
                rows.append(f"| {name} | failed: {exc} |")
                print(rows[-1], flush=True)
                continue
        same = [("yes" if first[f] == second[f] else "**no**") for f in args.formats.split(",")]
        kept = "same" if first["fp32_layers"] == second["fp32_layers"] else "**differ**"
        rows.append(f"| {name} | {t1:.0f} | {t2:.0f} | {len(first['fp32_layers'])}, {kept} | " + " | ".join(same) + " |")
        print(rows[-1], flush=True)
    header = (f"# Same model, same bytes\n\n`bench/determinism.py {' '.join(sys.argv[1:])}`, "
              f"{time.strftime('%Y-%m-%d')}: `{args.pipeline}` run twice per model in fresh processes, the "
              f"second with the other core spinning; artifacts compared by sha256.\n\n")
    args.out.write_text(header + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
