"""devtools.sqlasuite's judging, on junit XML written here: stable test ids without the
backend suffix, the worst outcome of a test reported twice, and which failures are new."""

from __future__ import annotations

from pathlib import Path

from devtools.sqlasuite import EXPECTED, Expected, judge, load_expected, read_junit, stable_id

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="test_suite_sqlalchemy.ArrayTest_postgresql+pgbroker_15_18"
          name="test_literal_simple" time="0.1">
  <failure message="NotSupportedError: cached plan must not change result type">tb</failure>
</testcase>
<testcase classname="test_suite_sqlalchemy.JSONTest_postgresql+pgbroker_15_18"
          name="test_round_trip[a-b]" time="0.1"/>
<testcase classname="test_suite_sqlalchemy.JSONTest_postgresql+pgbroker_15_18"
          name="test_round_trip[a-b]" time="0.1">
  <error message="failed on teardown">tb</error>
</testcase>
<testcase classname="test_suite_alembic.AlterColumnTest_postgresql+pgbroker_15_18"
          name="test_x" time="0.1"><skipped message="pgbroker: temp tables"/></testcase>
<testcase classname="test_suite_alembic.OpTest_postgresql+pgbroker_15_18"
          name="test_y" time="0.1"><failure message="AssertionError">tb</failure></testcase>
</testsuite></testsuites>
"""


def test_ids_drop_the_backend_suffix() -> None:
    assert (
        stable_id("test_suite_sqlalchemy.ArrayTest_postgresql+pg8000_15_18", "test_a[x]")
        == "test_suite_sqlalchemy.py::ArrayTest::test_a[x]"
    )


def test_outcomes_counts_and_new_failures(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    outcomes = read_junit(path)
    assert outcomes.by_test["test_suite_sqlalchemy.py::JSONTest::test_round_trip[a-b]"] == "error"
    assert outcomes.counts("sqlalchemy") == {"failed": 1, "error": 1}
    assert outcomes.counts("alembic") == {"skipped": 1, "failed": 1}
    expected = Expected(
        by_test={"test_suite_alembic.py::OpTest::test_y": "a reason"},
        by_message={"cached plan must not change result type": "the broker's cache"},
        ci_tests=[],
        ci_args=[],
    )
    new, fixed = judge(outcomes, expected)
    assert new == ["test_suite_sqlalchemy.py::JSONTest::test_round_trip[a-b]"]
    assert fixed == []


def test_the_committed_list_gives_every_entry_a_reason() -> None:
    expected = load_expected(EXPECTED)
    assert all(reason.strip() for reason in expected.by_test.values())
    assert all(len(reason) > 40 for reason in expected.by_message.values())
    assert expected.ci_tests
