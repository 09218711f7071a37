"""Requirements for SQLAlchemy's and Alembic's dialect compliance suites (README.dialects.rst).

The suites' own ``SuiteRequirements`` are conservative: they close every feature a database may
lack (views, CTEs, window functions, …), so on Postgres they skip tests Postgres passes and
even fail some (a test that expects temporary tables to be invisible, DISTINCT ON to warn).

* `GenericRequirements`: those defaults unchanged, the baseline the issue measured with
  stock pg8000.
* `Requirements`: what Postgres supports — the answers SQLAlchemy's and Alembic's own
  ``test/requirements.py`` give for ``postgresql`` on this server — for both dialects; then the
  pgbroker overrides (`BROKER_OVERRIDES`): features that work on Postgres but not through a
  transaction pooler, skipped for the pgbroker dialect only, each with its reason. Stock
  pg8000 runs with the same class, so the two dialects' counts differ only by those overrides
  and by real failures. docs/sqlalchemy.md lists the overrides.
"""

from __future__ import annotations

from typing import Any

from alembic.testing.requirements import SuiteRequirements as AlembicRequirements
from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements


class GenericRequirements(SuiteRequirements, AlembicRequirements):
    """SQLAlchemy's and Alembic's own defaults, unchanged."""


# Closed by the suites' defaults, open for Postgres in SQLAlchemy's and Alembic's own
# test/requirements.py (evaluated against this Postgres 15 server).
POSTGRES_FEATURES = (
    # SQL
    "aggregate_order_by", "boolean_col_expressions", "ctes", "ctes_on_dml",
    "ctes_with_update_delete", "ctes_with_values", "except_", "intersect", "fetch_expression",
    "fetch_first", "fetch_no_order_by", "fetch_offset_with_options", "fetch_ties",
    "nullsordering", "order_by_collation", "regexp_match", "regexp_replace",
    "supports_bitwise_and", "supports_bitwise_not", "supports_bitwise_or",
    "supports_bitwise_shift", "supports_bitwise_xor", "supports_distinct_on",
    "table_value_constructor", "tuple_in", "tuple_in_w_empty", "update_from",
    "window_functions", "window_range", "window_range_non_numeric", "window_range_numeric",
    # types
    "array_type", "cast_precision_numerics_many_significant_digits", "date_historic",
    "datetime_historic", "datetime_interval", "datetime_literals", "datetime_timezone",
    "float_or_double_precision_behaves_generically", "json_array_indexes", "json_type",
    "legacy_unconditional_json_extract", "precision_numerics_enotation_small",
    "precision_numerics_many_significant_digits", "precision_numerics_retains_significant_digits",
    "uuid_data_type",
    # DDL (computed columns: below)
    "computed_columns_reflect_persisted", "create_or_replace_view", "create_table_as",
    "create_temp_table_as", "deferrable_fks", "expression_server_defaults", "identity_columns",
    "identity_columns_standard", "index_ddl_if_exists", "indexes_with_expressions",
    "materialized_views", "schema_create_delete", "server_defaults", "table_ddl_if_exists",
    "temporary_views", "unicode_ddl", "views",
    # reflection
    "check_constraint_reflection", "column_collation_reflection", "comment_reflection",
    "comment_reflection_full_unicode", "constraint_comment_reflection",
    "cross_schema_fk_reflection", "fk_constraint_option_reflection_ondelete_noaction",
    "fk_constraint_option_reflection_ondelete_restrict",
    "fk_constraint_option_reflection_onupdate_restrict", "foreign_key_constraint_name_reflection",
    "foreign_key_constraint_option_reflection_ondelete",
    "foreign_key_constraint_option_reflection_onupdate", "has_temp_table",
    "implicit_default_schema",
    "index_reflects_included_columns", "indexes_check_column_order",
    "inline_check_constraint_reflection", "reflect_indexes_with_expressions",
    "reflect_table_options", "reflect_tables_no_columns", "reflects_pk_names",
    "repeated_column_foreign_keys", "temp_table_comment_reflection", "temp_table_names",
    "unique_constraints_reflect_as_index", "view_column_reflection", "view_reflection",
    # connections and transactions
    "autocommit", "default_schema_name_switch", "isolation_level", "percent_schema_names",
    "savepoints", "skip_autocommit_rollback",
    # Alembic's
    "autocommit_isolation", "autoincrement_on_composite_pk", "fk_deferrable",
    "fk_deferrable_is_reflected", "fk_initially", "fk_ondelete_is_reflected",
    "fk_onupdate_is_reflected", "identity_columns_alter", "reflects_fk_options",
)  # fmt: skip


def _on_pgbroker(config: Any) -> bool:
    return bool(config.db.dialect.driver == "pgbroker")


def broker_differs(reason: str) -> exclusions.compound:
    """Skip for the pgbroker dialect only, saying why."""
    return exclusions.skip_if(_on_pgbroker, f"pgbroker: {reason}")


# Requirement -> why the broker cannot offer it although Postgres does. docs/sqlalchemy.md
# repeats this table; keep them together.
_TEMP_TABLES = (
    "a temporary table outlives its transaction, and the broker returns the Postgres "
    "connection to the pool when the transaction ends, so it refuses CREATE TEMP TABLE "
    "without ON COMMIT DROP (the next statement may run on another connection)"
)
BROKER_OVERRIDES: dict[str, str] = {
    "temporary_tables": _TEMP_TABLES,
    "temp_table_reflection": _TEMP_TABLES,
    "temp_table_reflect_indexes": _TEMP_TABLES,
    "temp_table_names": _TEMP_TABLES,
    "temp_table_comment_reflection": _TEMP_TABLES,
    "has_temp_table": _TEMP_TABLES,
    "temporary_views": _TEMP_TABLES,
    "create_temp_table_as": _TEMP_TABLES,
    "default_schema_name_switch": (
        "the tests switch the default schema with SET search_path on connect: session state, "
        "which the broker refuses (it would reach the next caller of the pooled connection); "
        "use schema-qualified names or SET LOCAL search_path inside a transaction"
    ),
}


class Requirements(GenericRequirements):
    """What Postgres supports, less the broker's overrides for the pgbroker dialect."""

    @property
    def independent_connections(self) -> exclusions.compound:
        """Two connections at once: each is its own pooled connection, for both dialects."""
        return exclusions.open()

    def get_isolation_levels(self, config: Any) -> dict[str, Any]:
        """The levels the dialect accepts; the default must be Postgres' READ COMMITTED."""
        levels = super().get_isolation_levels(config)
        return {**levels, "default": "READ COMMITTED"}

    def get_order_by_collation(self, config: Any) -> str:
        """A collation every Postgres has (SQLAlchemy's own choice for postgresql)."""
        return "POSIX"

    # Computed columns: Postgres before 18 has STORED ones only, and SQLAlchemy warns when
    # it renders a Computed() without `persisted` as STORED (as SQLAlchemy's own
    # requirements say).
    @property
    def computed_columns(self) -> exclusions.compound:
        return exclusions.warns_if(
            "postgresql < 18", r".*PostgreSQL version does not support VIRTUAL", assert_=False
        )

    @property
    def computed_columns_stored(self) -> exclusions.compound:
        return self.computed_columns

    @property
    def computed_columns_virtual(self) -> exclusions.compound:
        return self.computed_columns + exclusions.skip_if("postgresql < 18")

    @property
    def computed_columns_default_persisted(self) -> exclusions.compound:
        return self.computed_columns + exclusions.only_if("postgresql < 18")


def _install() -> None:
    for name in POSTGRES_FEATURES:
        if not isinstance(
            getattr(SuiteRequirements, name, None) or getattr(AlembicRequirements, name, None),
            property,
        ):
            raise AttributeError(f"no suite requirement named {name!r}")
        setattr(Requirements, name, exclusions.open())
    for name, reason in BROKER_OVERRIDES.items():
        setattr(Requirements, name, _with_override(getattr(Requirements, name), reason))


def _with_override(inherited: Any, reason: str) -> property:
    """A requirement that is *inherited* (a property or an exclusion) and, for pgbroker,
    skipped for *reason*."""

    def requirement(self: Requirements) -> exclusions.compound:
        base = inherited.__get__(self) if isinstance(inherited, property) else inherited
        return base + broker_differs(reason)

    return property(requirement)


_install()
