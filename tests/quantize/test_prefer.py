"""quantize's layer choice for speed: prefer=speed from the committed cost table (nothing timed, the
same on every run), prefer=measure timed in onnxruntime, its timings written to a file and replayed."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from graphopt.capture import capture
from graphopt.errors import PassError
from graphopt.passmanager import run_pipeline
from graphopt_plugins.quantize import costs
from zoo.cnn import tiny_mobilenet, tiny_resnet

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def calibration(n=4):
    return [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(n)]


def run(registry, model, options=""):
    result = run_pipeline(capture(model, (X,)), f"cleanup,fold-bn,fuse,quantize({options})", registry,
                          data={"calibration": calibration()})
    return result.records[-1]


@pytest.fixture
def no_timing(monkeypatch):
    """prefer=speed must not time anything: onnxruntime timing raises."""
    from graphopt_plugins.quantize import speed

    def refuse(*args, **kwargs):
        raise AssertionError("timed during the run")
    monkeypatch.setattr(speed, "measure", refuse)
    monkeypatch.setattr(speed, "time_graphs", refuse)


def made_up_table(monkeypatch, slow: dict[str, dict[str, float]]):
    """The committed table with the given classes' ratios replaced (class prefix -> format -> ratio)."""
    table = json.loads(json.dumps(costs.table()))
    for name, entry in table["classes"].items():
        for prefix, ratios in slow.items():
            if name.startswith(prefix):
                for fmt, ratio in ratios.items():
                    entry[fmt]["ratio"] = ratio
    monkeypatch.setattr(costs, "table", lambda: table)


def test_the_committed_table_covers_every_format_and_layer_family():
    table = costs.table()
    families = {name.split("_")[0] for name in table["classes"]}
    assert families == {"conv1x1", "conv3x3", "dw3x3", "dw5x5", "dw7x7", "gconv3x3", "linear"}
    for entry in table["classes"].values():
        assert {f: 0.05 < entry[f]["ratio"] < 20 and entry[f]["fp32_ms"] > 0 for f in costs.FORMATS} == \
            dict.fromkeys(costs.FORMATS, True)


@pytest.mark.parametrize("module,shape,expected", [
    (nn.Conv2d(96, 96, 3, padding=1, groups=96), (1, 96, 56, 56), ("dw3x3", 96, 56, 1)),
    (nn.Conv2d(40, 40, 5, stride=2, padding=2, groups=40), (1, 40, 28, 28), ("dw5x5", 40, 28, 1)),
    (nn.Conv2d(64, 256, 1), (1, 256, 14, 14), ("conv1x1", 128, 14, 0)),
    (nn.Conv2d(128, 128, 3, padding=1, groups=32), (1, 128, 28, 28), ("gconv3x3", 128, 28, 4)),
    (nn.Linear(768, 768), (1, 197, 768), ("linear", 768, 197, 0)),
])
def test_a_layer_is_looked_up_by_kind_width_size_and_group_width(module, shape, expected):
    from torch import fx
    gm = fx.symbolic_trace(nn.Sequential(module))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    node.meta["graphopt.shape"] = shape
    assert costs.layer_class(gm, node) == pytest.approx(expected)
    name, ratios = costs.ratios(gm, node)
    assert name.startswith(expected[0] + "_") and set(ratios) == set(costs.FORMATS)


def test_prefer_speed_keeps_fp32_the_classes_the_table_finds_slower(registry, monkeypatch, no_timing):
    made_up_table(monkeypatch, {"dw3x3": dict.fromkeys(costs.FORMATS, 2.0)})
    record = run(registry, tiny_mobilenet())
    kept = record.stats["fp32_layers"]
    assert kept and record.stats["int8_layers"] > len(kept)
    assert all("cost table" in e for e in record.explanations if e.startswith(tuple(kept)) and ": fp32;" in e)
    gm = run_pipeline(capture(tiny_mobilenet(), (X,)), "cleanup,fold-bn,fuse", registry).graph.module
    depthwise = {n.name for n in gm.graph.nodes if n.op == "call_module" and
                 getattr(gm.get_submodule(n.target), "groups", 1) > 1}
    assert set(kept) == depthwise and record.stats["decided_for"] == list(costs.FORMATS)


def test_prefer_speed_decides_for_the_formats_it_is_given(registry, monkeypatch, no_timing):
    """dw3x3 made up 3x slower in tflite only: for tflite they stay fp32, for onnx,ptl they are int8, and
    over all four formats the geometric mean (3^(1/4) = 1.32) keeps them fp32."""
    made_up_table(monkeypatch, {"dw3x3": {"onnx": 0.8, "ptl": 0.8, "tflite": 3.0, "pte": 1.0}})
    tflite = run(registry, tiny_mobilenet(), "formats=tflite")
    onnx_ptl = run(registry, tiny_mobilenet(), 'formats="onnx,ptl"')
    assert tflite.stats["fp32_layers"] and not onnx_ptl.stats["fp32_layers"]
    assert tflite.stats["decided_for"] == ["tflite"] and onnx_ptl.stats["decided_for"] == ["onnx", "ptl"]


def test_the_default_is_the_same_on_every_run(registry, no_timing):
    first, second = run(registry, tiny_resnet()), run(registry, tiny_resnet())
    assert first.stats == second.stats and first.stats["prefer"] == "speed"


@pytest.mark.parametrize("options,message", [
    ("formats=coreml", "formats='coreml'"), ("timings=t.json", "timings= replays prefer=measure")])
def test_bad_options_are_refused(registry, options, message):
    with pytest.raises(PassError, match=message):
        run(registry, tiny_resnet(), options)


def test_prefer_measure_times_every_layer_in_onnxruntime_and_replays_the_file(registry, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from graphopt_plugins.quantize import speed

    path = tmp_path / "timings.json"
    measured = run(registry, tiny_resnet(), f'prefer=measure,timings="{path}"')
    timings, whole = measured.stats["timings_ms"], measured.stats["whole_graph_ms"]
    assert len(timings) == 16 and set(whole) == {"mixed", "all_int8", "fp32"} and min(whole.values()) > 0
    assert all(fp32 > 0 and int8 > 0 for fp32, int8 in timings.values())
    assert set(json.loads(path.read_text())["layers_ms"]) == set(timings)
    monkeypatch.setattr(speed, "measure", lambda *a, **k: pytest.fail("measured instead of replaying"))
    replayed = run(registry, tiny_resnet(), f'prefer=measure,timings="{path}"')
    assert replayed.stats["fp32_layers"] == measured.stats["fp32_layers"]
    assert replayed.stats["timings_ms"] == timings and replayed.stats["whole_graph_ms"] == whole
    with pytest.raises(PassError, match="recorded for other layers"):
        run(registry, tiny_mobilenet(), f'prefer=measure,timings="{path}"')


@pytest.mark.parametrize("whole,kept", [
    ((2.0, 3.0, 4.0), "slow"),      # the mix with the slow layers in fp32 is fastest: those stay fp32
    ((3.0, 2.0, 4.0), "none"),      # every layer int8 beats the mix: none stays fp32
    ((3.0, 3.5, 1.0), "all"),       # fp32 beats both: nothing is quantized
])
def test_prefer_measure_follows_the_timings_it_is_given(registry, monkeypatch, whole, kept):
    """The decision, from timings made up here (1 ms fp32 per layer; 2 ms int8 for the two slow
    layers, 0.5 ms for the others; whole graphs as given), not recomputed from the pass's own."""
    speed = pytest.importorskip("graphopt_plugins.quantize.speed")
    slow: list[str] = []

    def measure(emitter, gm, layers, chosen, runs=40):
        names = [layer.node.name for layer in layers]
        slow[:] = names[1:3]
        return {n: (1.0, 2.0 if n in slow else 0.5) for n in names}

    monkeypatch.setattr(speed, "measure", measure)
    monkeypatch.setattr(speed, "time_graphs", lambda emitter, graphs, inputs, runs=20: list(whole))
    stats = run(registry, tiny_resnet(), "prefer=measure").stats
    expected = {"slow": sorted(slow), "none": [], "all": sorted(stats["timings_ms"])}[kept]
    assert len(slow) == 2 and sorted(stats["fp32_layers"]) == expected
    assert stats["int8_layers"] == 16 - len(expected)
