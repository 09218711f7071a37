"""Features: the stock postgresql backend's, less what a transaction pooler cannot do; every
test of Django's suite this backend skips is listed in `django_test_skips` with its reason."""

from __future__ import annotations

import django
from django.db.backends.postgresql import features as stock
from django.utils.functional import cached_property


class DatabaseFeatures(stock.DatabaseFeatures):
    # A broker serves one database: no cloned test databases (see creation.py).
    can_clone_databases = False

    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:  # type: ignore[override]
        skips = dict(super().django_test_skips)
        # Django's runner looks every name up: a test its version lacks is an error.
        for reason, tests in (*SKIPS.items(), *(SKIPS_6 if django.VERSION >= (6,) else {}).items()):
            skips[reason] = skips.get(reason, set()) | tests
        return skips


_PG = "backends.postgresql.tests.Tests."
_SSC = "backends.postgresql.test_server_side_cursors.ServerSideCursorsPostgres."

SKIPS: dict[str, set[str]] = {
    "COPY (psycopg's cursor.copy()) does not go through the broker.": {
        _PG + "test_copy_cursors",
    },
    "Server-side cursors are declared WITHOUT HOLD in a lease of their own (or atomic()'s), "
    "not on the connection Django holds, and are named by the backend: pg_cursors on Django's "
    "connection does not show them, and server_side_binding does not apply.": {
        _SSC + "test_closed_server_side_cursor",
        _SSC + "test_server_side_binding",
        _SSC + "test_server_side_cursor",
        _SSC + "test_server_side_cursor_many_cursors",
        _SSC + "test_server_side_cursors_setting",
        _SSC + "test_values",
        _SSC + "test_values_list",
        _SSC + "test_values_list_fields_not_equal_to_names",
        _SSC + "test_values_list_flat",
    },
    "SET or RESET without LOCAL changes the pooled connection's session; the broker refuses it "
    "(the test runs it itself, or runs the stock wrapper's session SET on this connection).": {
        "postgres_tests.test_unaccent.UnaccentTest.test_unaccent_with_conforming_strings_off",
        "postgres_tests.test_unaccent.UnaccentTextFieldTest.test_unaccent_with_conforming_strings_off",
        _PG + "test_connect_and_rollback",
        _PG + "test_bypass_timezone_configuration",
        _PG + "test_bypass_role_configuration",
    },
    "OPTIONS['assume_role'] (SET ROLE) is refused: the broker sets roles (PGBROKER_ROLE_MAP).": {
        _PG + "test_connect_role",
    },
    "OPTIONS['pool'] (psycopg's pool) does not apply: the broker pools.": {
        _PG + "test_connect_pool",
        _PG + "test_connect_pool_set_to_true",
        _PG + "test_connect_pool_with_timezone",
        _PG + "test_pooling_health_checks",
        _PG + "test_pooling_not_support_persistent_connections",
    },
    "OPTIONS['server_side_binding'] and ['cursor_factory'] (psycopg cursor classes) do not "
    "apply: the backend writes literals as the stock default does and has its own cursor.": {
        _PG + "test_connect_server_side_binding",
        _PG + "test_connect_custom_cursor_factory",
    },
    "cursor.description has no sizes: the broker sends column type OIDs, not type modifiers.": {
        "introspection.tests.IntrospectionTests.test_get_table_description_col_lengths",
    },
}

# Tests Django 6.x added, under the reasons above.
SKIPS_6: dict[str, set[str]] = {
    "OPTIONS['pool'] (psycopg's pool) does not apply: the broker pools.": {
        _PG + "test_pool_check_can_be_overridden",
        _PG + "test_pool_options_not_mutated",
    },
    "cursor.description has no sizes: the broker sends column type OIDs, not type modifiers.": {
        "migrations.test_operations.OperationTests."
        "test_alter_field_reloads_state_on_transitive_attname_to_field_type_change",
    },
}
