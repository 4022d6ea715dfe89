import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import PluginError, load_plugins
from conftest import TESTS

GOOD = '''
import graphopt
from graphopt import Pass, PassResult

@graphopt.hookimpl
def graphopt_register_passes():
    return [Pass("noop-{n}", "does nothing", lambda gm, ctx: PassResult(gm, False))]
'''


def _plugin(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_builtins_come_from_entry_points(registry):
    names = {p.name for p in registry.plugins}
    assert {"cleanup", "fold-bn", "onnx"} <= names
    assert all(p.source.startswith("entry point graphopt_plugins.") for p in registry.plugins
               if p.name in {"cleanup", "fold-bn", "onnx"})
    assert registry.owner["pass:fold-bn"] == "fold-bn"
    assert registry.owner["emitter:onnx"] == "onnx"
    assert registry.default_pipeline().split(",")[:2] == ["cleanup", "fold-bn"]


def test_plugin_by_path_registers_and_runs(tmp_path):
    path = _plugin(tmp_path, "mine", GOOD.format(n="a"))
    reg = load_plugins([path])
    assert reg.owner["pass:noop-a"] == "mine"
    graph = graphopt.capture(nn.ReLU(), torch.randn(3))
    run = graphopt.run_pipeline(graph, "cleanup,noop-a", reg)
    assert [r.name for r in run.records] == ["cleanup", "noop-a"]
    assert all(r.verified for r in run.records)


def test_plugin_by_module_name(tmp_path, monkeypatch):
    _plugin(tmp_path, "my_mod_plugin", GOOD.format(n="b"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "noop-b" in load_plugins(["my_mod_plugin"]).passes


def test_blocking_a_builtin_removes_only_that_feature():
    reg = load_plugins(blocked=["fold-bn"])
    assert "fold-bn" not in reg.passes and "cleanup" in reg.passes and "onnx" in reg.emitters
    assert reg.default_pipeline().split(",")[0] == "cleanup" and "fold-bn" not in reg.default_pipeline()
    with pytest.raises(graphopt.PipelineError, match="unknown pass 'fold-bn'"):
        graphopt.run_pipeline(graphopt.capture(nn.ReLU(), torch.randn(2)), "fold-bn", reg)


def test_blocking_an_unknown_plugin_is_an_error():
    with pytest.raises(PluginError, match="cannot block nope: no such plugin"):
        load_plugins(blocked=["nope"])


def test_import_error_names_the_plugin(tmp_path):
    path = _plugin(tmp_path, "broken", "import does_not_exist_anywhere\n")
    with pytest.raises(PluginError, match=r"plugin broken \(.*broken.py\) failed to import: "
                                          r"ModuleNotFoundError: No module named 'does_not_exist_anywhere'"):
        load_plugins([path])


def test_bad_hook_signature_names_plugin_and_hook(tmp_path):
    path = _plugin(tmp_path, "badsig", '''
        import graphopt
        @graphopt.hookimpl
        def graphopt_register_passes(registry):
            return []
    ''')
    with pytest.raises(PluginError, match=r"plugin badsig.*graphopt_register_passes.*registry"):
        load_plugins([path])


def test_unknown_hook_is_reported(tmp_path):
    path = _plugin(tmp_path, "typo", '''
        import graphopt
        @graphopt.hookimpl
        def graphopt_register_pases():
            return []
    ''')
    with pytest.raises(PluginError, match=r"plugin typo.*graphopt_register_pases"):
        load_plugins([path])


def test_duplicate_pass_name_names_both_plugins(tmp_path):
    path = _plugin(tmp_path, "dupe", GOOD.replace("noop-{n}", "fold-bn"))
    with pytest.raises(PluginError, match=r"plugin dupe: pass 'fold-bn' is already registered by plugin fold-bn"):
        load_plugins([path])


@pytest.mark.parametrize("body, message", [
    ("return [Pass('Bad_Name', 'x', lambda gm, ctx: None)]", "not kebab-case"),
    ("return [object()]", "returned object, expected Pass"),
    ("return Pass('x', 'x', lambda gm, ctx: None)", "must return a list"),
    ("raise RuntimeError('boom')", "hook graphopt_register_passes raised RuntimeError: boom"),
    ("return [Pass('p', 'x', lambda gm, ctx: None, graphopt.Effect.STRUCTURAL)]", "structural but has no oracle"),
])
def test_invalid_registrations(tmp_path, body, message):
    path = _plugin(tmp_path, "invalid", f'''
        import graphopt
        from graphopt import Pass
        @graphopt.hookimpl
        def graphopt_register_passes():
            {body}
    ''')
    with pytest.raises(PluginError, match=f"plugin invalid: .*{message}"):
        load_plugins([path])


def test_missing_plugin_file():
    with pytest.raises(PluginError, match="plugin file /no/such/file.py does not exist"):
        load_plugins(["/no/such/file.py"])


def test_third_party_package_is_discovered_through_its_entry_point(tmp_path):
    """Install a real package (offline, into a private folder) and let a fresh interpreter
    discover it through the ``graphopt`` entry-point group."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(TESTS / "fixtures" / "example_plugin")],
                   check=True, capture_output=True, cwd=tmp_path)
    assert (target / "graphopt_example_plugin.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    listing = subprocess.run([sys.executable, "-m", "graphopt.cli", "passes", "--json"], env=env,
                             capture_output=True, text=True, check=True, cwd=tmp_path)
    rows = {p["name"]: p for p in json.loads(listing.stdout)["passes"]}
    assert rows["relu6-to-clamp"]["plugin"] == "example"
    code = ("import sys, torch, torch.nn as nn, graphopt\n"
            "reg = graphopt.load_plugins()\n"
            "g = graphopt.capture(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU6()), torch.randn(1, 1, 4, 4) * 9)\n"
            "run = graphopt.run_pipeline(g, 'relu6-to-clamp', reg)\n"
            "print(run.records[0].stats['replaced'], [n.target.__name__ for n in run.graph.module.graph.nodes "
            "if n.op == 'call_function'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "1 ['clamp']"
    blocked = subprocess.run([sys.executable, "-m", "graphopt.cli", "passes", "--json", "-p", "no:example"],
                             env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "relu6-to-clamp" not in blocked.stdout
