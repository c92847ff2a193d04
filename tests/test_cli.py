"""The command line and model loading: good inputs work, every bad input is one clear error.

Subprocess tests run ``python -m graphmerge.cli`` as a user would; the exit code of a bad input
is 2 and its stderr is one ``error: ...`` paragraph without a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from collections import Counter

import pytest
import torch
import torch.fx
from graphmerge.passes.ir import Group, GroupSet, PinReason
from torch import nn

from graphmerge.cli import PALETTE, PINNED_COLOUR, graph_to_dot
from graphmerge.errors import GraphMergeError
from graphmerge.loading import load_model, parse_input_shape

MLP_FILE = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 7)
            self.fc2 = nn.Linear(7, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def build_model():
        return Net()

    def example_inputs():
        return torch.randn(5, 4)
"""

CLASS_ONLY_FILE = """
    import torch
    from torch import nn

    class Block(nn.Module):  # needs an argument: not a candidate
        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

    class Net(nn.Module):
        def __init__(self, hidden=6):
            super().__init__()
            self.fc1 = nn.Linear(4, hidden)
            self.fc2 = nn.Linear(hidden, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))
"""

UNTRACEABLE_FILE = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.mean() > 0:
                x = self.fc(x)
            return x

    def build_model():
        return Net()

    def example_inputs():
        return (torch.randn(2, 4),)
"""


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, one ``error:`` paragraph on stderr naming every fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def widths_of(groups: list[dict], pinned: bool) -> Counter:
    return Counter(g["width"] for g in groups if g["pinned"] == pinned)


# --- good inputs (these run the real coupling analysis) -----------------------------------

def test_trace_resnet20_json_finds_the_residual_and_block_groups(run_cli):
    result = run_cli("trace", "examples:resnet20", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    groups = data["groups"]
    for group in groups:
        assert {"id", "width", "pinned", "reason", "producers", "consumers"} <= group.keys()
    # per stage: one residual stream (stem/projection + every block's conv2) and one group
    # inside each of the 3 blocks; image channels (3) and logits (10) are pinned
    assert widths_of(groups, pinned=False) == Counter({16: 4, 32: 4, 64: 4})
    assert {3, 10} <= set(widths_of(groups, pinned=True))


def test_trace_a_model_file_with_a_factory(run_cli, write_file):
    write_file("net.py", MLP_FILE)
    result = run_cli("trace", "net.py", "--json")
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["groups"]
    assert widths_of(groups, pinned=False) == Counter({7: 1})
    assert widths_of(groups, pinned=True) == Counter({4: 1, 3: 1})
    hidden = next(g for g in groups if not g["pinned"])
    assert hidden["producers"] == ["fc1"] and hidden["consumers"] == ["fc2"]


def test_trace_table_shows_groups_and_totals(run_cli, write_file, tmp_path):
    write_file("models/net.py", CLASS_ONLY_FILE)  # one buildable class, no factory
    result = run_cli("trace", "models/net.py", "--input-shape", "3,4", "--dot", "graph.dot")
    assert result.returncode == 0, result.stderr
    assert "coupling groups of Net" in result.stdout
    assert re.search(r"\d+ nodes, 3 groups: 1 widened, 2 pinned", result.stdout), result.stdout
    dot = (tmp_path / "graph.dot").read_text()
    assert dot.startswith("digraph") and '"linear" -> "relu"' in dot  # ATen node names


def test_trace_a_named_class_in_a_file(run_cli, write_file):
    write_file("net.py", CLASS_ONLY_FILE)
    result = run_cli("trace", "net.py:Net", "--input-shape", "2,4", "--json")
    assert result.returncode == 0, result.stderr
    assert widths_of(json.loads(result.stdout)["groups"], pinned=False) == Counter({6: 1})


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "graphmerge 0.1.0"


# --- bad inputs: each is exit code 2 with the cause named ----------------------------------

def test_missing_file(run_cli):
    assert_user_error(run_cli("trace", "nowhere/model.py"), "nowhere/model.py", "does not exist")


def test_syntax_error_names_file_and_line(run_cli, write_file):
    write_file("broken.py", "import torch\n\ndef build_model(:\n    pass\n")
    assert_user_error(run_cli("trace", "broken.py"), "syntax error", "broken.py:3")


def test_import_error_inside_the_file(run_cli, write_file):
    write_file("needs.py", "import torch\nimport not_a_real_package_xyz\n")
    assert_user_error(run_cli("trace", "needs.py"), "not_a_real_package_xyz", "needs.py:2",
                      "Install")


def test_no_candidate_lists_what_was_found(run_cli, write_file):
    write_file("empty.py", """
        from torch import nn

        class Block(nn.Module):
            def __init__(self, width):
                super().__init__()
    """)
    assert_user_error(run_cli("trace", "empty.py"), "Block(width)", "empty.py:NAME")


def test_several_candidates_are_listed(run_cli, write_file):
    write_file("two.py", """
        from torch import nn

        class A(nn.Module):
            pass

        class B(nn.Module):
            pass
    """)
    assert_user_error(run_cli("trace", "two.py"), "A()", "B()", "two.py:NAME")


def test_several_factories_are_listed(run_cli, write_file):
    write_file("two.py", textwrap.dedent(MLP_FILE) + "\ndef get_model():\n    return Net()\n")
    assert_user_error(run_cli("trace", "two.py"), "build_model, get_model", "two.py:NAME")


def test_a_factory_that_raises_is_named_with_its_exception(run_cli, write_file):
    write_file("bad.py", """
        def build_model():
            raise ValueError("widths must be positive")
    """)
    assert_user_error(run_cli("trace", "bad.py"), "build_model()", "ValueError",
                      "widths must be positive", "bad.py:3")


def test_a_factory_returning_a_non_module(run_cli, write_file):
    write_file("bad.py", "def build_model():\n    return 42\n")
    assert_user_error(run_cli("trace", "bad.py"), "build_model()", "int", "not a torch.nn.Module")


def test_an_unknown_name_in_a_file(run_cli, write_file):
    write_file("net.py", MLP_FILE)
    assert_user_error(run_cli("trace", "net.py:buld_model"), "'buld_model'", "build_model")


def test_an_untraceable_model_names_the_line(run_cli, write_file):
    path = write_file("net.py", UNTRACEABLE_FILE)
    assert_user_error(run_cli("trace", "net.py"), f"{path}:11", "if x.mean() > 0:", "control flow")


def test_no_example_input_asks_for_input_shape(run_cli, write_file):
    write_file("net.py", CLASS_ONLY_FILE)
    assert_user_error(run_cli("trace", "net.py"), "no example input", "--input-shape")


def test_bad_input_shape(run_cli):
    assert_user_error(run_cli("trace", "examples:mlp", "--input-shape", "1,3,a"), "bad input shape",
                      "'1,3,a'", "1,3,224,224")


@pytest.mark.parametrize("text", ["", "1,,2", "0,3", "-1,3", "1.5,2", "3;4"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(GraphMergeError, match="bad input shape.*--input-shape 1,3,224,224"):
        parse_input_shape(text)


def test_an_input_shape_the_model_rejects(run_cli):
    assert_user_error(run_cli("trace", "examples:lenet", "--input-shape", "2,1,32,32"),
                      "(2, 1, 32, 32)", "--input-shape")


def test_unknown_torchvision_model_suggests_close_names(run_cli):
    assert_user_error(run_cli("trace", "torchvision:resnet181"), "resnet181", "resnet18")


def test_unknown_example(run_cli):
    assert_user_error(run_cli("trace", "examples:resnet21"), "resnet21", "resnet20")


def test_unrecognised_spec(run_cli):
    assert_user_error(run_cli("trace", "model.txt"), "model.txt", "torchvision:NAME")


def test_dot_into_a_missing_folder_writes_nothing(run_cli, tmp_path):
    assert_user_error(run_cli("trace", "examples:mlp", "--dot", "no/such/dir/g.dot"), "no/such/dir")
    assert not (tmp_path / "no").exists()


def test_svg_needs_graphviz(run_cli, tmp_path):
    result = run_cli("trace", "examples:mlp", "--svg", "g.svg")
    if shutil.which("dot") is None:
        assert_user_error(result, "Graphviz", "--dot")
        assert not (tmp_path / "g.svg").exists()
    else:
        assert result.returncode == 0, result.stderr
        assert "<svg" in (tmp_path / "g.svg").read_text()


# --- loading, in process ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "shape"), [("1,3,224,224", (1, 3, 224, 224)), ("16,1", (16, 1)),
                                             (" 2x3x8x8 ", (2, 3, 8, 8)), ("7", (7,))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize(("name", "shape"), [("examples:resnet20", (2, 3, 32, 32)),
                                             ("examples:lenet", (2, 3, 32, 32)),
                                             ("examples:mlp", (16, 1))])
def test_examples_load_with_their_inputs(name, shape):
    loaded = load_model(name)
    assert tuple(loaded.example_inputs[0].shape) == shape
    assert loaded.model(*loaded.example_inputs).shape[0] == shape[0]
    assert loaded.source == name


def test_resnet20_has_projection_shortcuts_where_the_shape_changes():
    model = load_model("examples:resnet20").model
    projections = [name for name, m in model.named_modules()
                   if name.endswith("shortcut") and len(m) > 0]
    assert projections == ["layers.3.shortcut", "layers.6.shortcut"]
    assert isinstance(model.layers[3].shortcut[0], nn.Conv2d)
    assert model.layers[3].shortcut[0].kernel_size == (1, 1)
    assert isinstance(model.layers[3].shortcut[1], nn.BatchNorm2d)


def test_lenet_flattens_sixteen_5x5_maps():
    model = load_model("examples:lenet").model
    assert model.fc1.in_features == 400 and model.fc3.out_features == 10


@pytest.mark.parametrize(("name", "shape"), [("resnet18", (2, 3, 64, 64)),
                                             ("inception_v3", (2, 3, 299, 299)),
                                             ("vit_b_32", (2, 3, 224, 224))])
def test_torchvision_default_inputs_run(name, shape):
    loaded = load_model(f"torchvision:{name}")
    assert tuple(loaded.example_inputs[0].shape) == shape
    with torch.no_grad():
        assert loaded.model.eval()(*loaded.example_inputs).shape == (2, 1000)


def test_input_shape_overrides_the_file(write_file):
    path = write_file("net.py", MLP_FILE)
    loaded = load_model(str(path), input_shape=(9, 4))
    assert tuple(loaded.example_inputs[0].shape) == (9, 4)
    assert loaded.source == f"{path}:build_model" and loaded.name == "Net"


def test_two_files_with_one_name_do_not_collide(write_file):
    a = write_file("a/net.py", MLP_FILE)
    b = write_file("b/net.py", MLP_FILE.replace("nn.Linear(4, 7)", "nn.Linear(4, 8)")
                   .replace("nn.Linear(7, 3)", "nn.Linear(8, 3)"))
    assert load_model(str(a)).model.fc1.out_features == 7
    assert load_model(str(b)).model.fc1.out_features == 8


def test_a_class_needing_arguments_cannot_be_named_directly(write_file):
    path = write_file("net.py", CLASS_ONLY_FILE)
    with pytest.raises(GraphMergeError, match=r"needs arguments \(width\).*build_model"):
        load_model(f"{path}:Block", input_shape=(2, 4))


# --- graph output with a stand-in GroupSet (independent of the coupling pass) ---------------

def stand_in_groups() -> GroupSet:
    """Groups of a 4 -> 7 -> 3 MLP written by hand: what the coupling pass should report."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3)))
    return GroupSet([
        Group(0, 4, pinned=True, reason="graph input", pin_reason=PinReason.GRAPH_INPUT, consumers=["_0"]),
        Group(1, 7, producers=["_0"], consumers=["_2"], members=["_1"]),
        Group(2, 3, pinned=True, reason="graph output", pin_reason=PinReason.GRAPH_OUTPUT, producers=["_2"],
              members=["output"]),
    ], gm)


def dot_fill(dot: str, node: str) -> str:
    return re.search(rf'^  "{node}" \[.*fillcolor="([^"]+)"', dot, re.M).group(1)


def test_dot_colours_nodes_by_group():
    dot = graph_to_dot(stand_in_groups(), "mlp")
    assert dot.startswith('digraph "mlp" {') and dot.rstrip().endswith("}")
    assert dot_fill(dot, "_0") == dot_fill(dot, "_1") == PALETTE[1]  # producer, member of group 1
    assert dot_fill(dot, "_2") == PALETTE[1]  # consumer of group 1, producer of pinned group 2
    assert dot_fill(dot, "output") == PINNED_COLOUR
    assert dot_fill(dot, "input_1") == "white"
    edges = re.findall(r'^  "(\w+)" -> "(\w+)";$', dot, re.M)
    assert edges == [("input_1", "_0"), ("_0", "_1"), ("_1", "_2"), ("_2", "output")]
