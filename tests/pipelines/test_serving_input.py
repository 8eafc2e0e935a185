"""What the serving model takes as a query (no model is loaded here)."""

import pandas as pd
import pytest

from pipelines.serving_model import query_texts


def test_strings_pass_and_are_cut_to_the_bound():
    assert query_texts(pd.DataFrame({"text": ["a man", "a woman"]}), 100) == ["a man", "a woman"]
    assert query_texts(["a man in red"], 5) == ["a man"]
    assert query_texts(("x" * 10_000_000,), 77 * 64) == ["x" * (77 * 64)]


@pytest.mark.parametrize(
    "model_input, needle",
    [
        (pd.DataFrame({"text": ["a man", None]}), r"row 1: field 'text' is missing \(null\)"),
        (["a man", None], r"row 1: field 'text' is missing \(null\)"),
        ([b"a man"], r"row 0: field 'text' must be a string, got bytes"),
        ([["a", "man"]], r"row 0: field 'text' must be a string, got list"),
        ([3.5], r"row 0: field 'text' must be a string, got float"),
        (["a man", "   \n"], r"row 1: field 'text' is empty"),
        (["\u200b\u200d\ufeff "], r"row 0: field 'text' is empty"),
        (pd.DataFrame({"query": ["x"]}), r"field 'text' missing; columns are \['query'\]"),
        ("a man", r"a DataFrame with a 'text' column or a list of strings, got str"),
    ],
)
def test_what_is_not_a_query_is_refused_naming_the_row(model_input, needle):
    with pytest.raises(ValueError, match=needle):
        query_texts(model_input, 100)
