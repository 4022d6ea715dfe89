import pytest

from graphopt import Effect, Option, Pass, PassResult, PipelineError, parse_pipeline
from graphopt.pipeline import Pipeline, PipelineItem, resolve


@pytest.mark.parametrize("text", [
    "cleanup",
    "cleanup,fold-bn,prune(ratio=0.5)",
    "prune(ratio=0.5,round_to=8),fold-bn",
    'fp16(blocklist="softmax layer_norm")',
    "quantize",
])
def test_round_trip(text):
    p = parse_pipeline(text)
    assert str(p) == text
    assert parse_pipeline(str(p)) == p


def test_whitespace_and_empty_parens_normalise():
    p = parse_pipeline(" cleanup , prune( ratio = 0.5 ) , fold-bn() ")
    assert p == Pipeline((PipelineItem("cleanup"), PipelineItem("prune", (("ratio", "0.5"),)),
                          PipelineItem("fold-bn")))
    assert str(p) == "cleanup,prune(ratio=0.5),fold-bn"


@pytest.mark.parametrize("text, where", [
    ("", "empty pipeline"),
    ("cleanup,", "expected a name, got end of text"),
    ("prune(ratio=0.5", "expected ')'"),
    ("prune(ratio)", "expected '='"),
    ("prune(ratio=1,ratio=2)", "given twice"),
    ("a b", "expected ','"),
])
def test_syntax_errors_say_where(text, where):
    with pytest.raises(PipelineError, match=where.replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline(text)


def _passes():
    noop = lambda gm, ctx: PassResult(gm, False)
    return {
        "fold-bn": Pass("fold-bn", "fold", noop),
        "prune": Pass("prune", "prune", noop, Effect.EXACT, options=(
            Option("ratio", float, 0.3, "fraction removed"),
            Option("round_to", int, 1, "round widths"),
            Option("global_rank", bool, False, "rank globally"),
            Option("criterion", str, "l1", "importance", choices=("l1", "l2"))))}


def test_resolve_types_options_and_fills_defaults():
    steps = resolve(parse_pipeline("fold-bn,prune(ratio=0.5,global_rank=yes)"), _passes())
    assert [s.name for s, _ in steps] == ["fold-bn", "prune"]
    assert steps[1][1] == {"ratio": 0.5, "round_to": 1, "global_rank": True, "criterion": "l1"}


def test_unknown_pass_lists_close_matches():
    with pytest.raises(PipelineError, match=r"unknown pass 'fold-nb'; did you mean fold-bn\?.*available: fold-bn, prune"):
        resolve(parse_pipeline("fold-nb"), _passes())


def test_unknown_option_lists_valid_options():
    with pytest.raises(PipelineError, match=r"no option 'ratoi'; did you mean ratio\? valid options: ratio, round_to, global_rank, criterion"):
        resolve(parse_pipeline("prune(ratoi=0.5)"), _passes())


@pytest.mark.parametrize("text, msg", [
    ("prune(ratio=half)", "ratio takes a float, got 'half'"),
    ("prune(round_to=2.5)", "round_to takes an int"),
    ("prune(global_rank=maybe)", "global_rank takes a bool"),
    ("prune(criterion=l3)", "criterion must be one of l1, l2"),
])
def test_bad_option_values(text, msg):
    with pytest.raises(PipelineError, match=msg):
        resolve(parse_pipeline(text), _passes())
