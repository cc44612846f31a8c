from infmoe.markdown import markdown_row, markdown_table, number_cell


def test_a_table_is_its_header_rule_and_rows_and_nothing_else():
    assert markdown_table(["a", "b"], [["1", ""], ["x", "y"]]) == ["| a | b |", "|---|---|", "| 1 |  |", "| x | y |"]
    assert markdown_table(["a"], []) == ["| a |", "|---|"]
    assert markdown_row(["only"]) == "| only |"


def test_a_missing_number_is_a_dash():
    assert number_cell(None, ".2f") == "-"
    assert number_cell(0.5, ".0%") == "50%"
