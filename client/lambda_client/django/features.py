"""Features: the stock postgresql backend's, less what a transaction pooler cannot do; every
test of Django's suite this backend skips is listed in `django_test_skips` with its reason."""

from __future__ import annotations

from django.db.backends.postgresql import features as stock
from django.utils.functional import cached_property


class DatabaseFeatures(stock.DatabaseFeatures):
    # A broker serves one database: no cloned test databases (see creation.py).
    can_clone_databases = False

    @cached_property
    def django_test_skips(self) -> dict[str, set[str]]:  # type: ignore[override]
        skips = dict(super().django_test_skips)
        for reason, tests in SKIPS.items():
            skips[reason] = skips.get(reason, set()) | tests
        return skips


SKIPS: dict[str, set[str]] = {}
