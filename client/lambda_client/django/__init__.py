"""A Django database backend over pgbroker: ``ENGINE: "lambda_client.django"``.

::

    DATABASES = {"default": {"ENGINE": "lambda_client.django", "NAME": "app",
                             "OPTIONS": {"target": "dns:///broker.pgbroker.local:50051"}}}

It is Django's own postgresql backend (same vendor, same SQL compiler, schema editor,
introspection and ``django.contrib.postgres``) with the connection replaced: statements go to
the broker, ``atomic()`` holds one ``Transact`` lease, autocommit statements are one
``Execute`` each. docs/django.md describes the settings, what differs from the stock backend
and why. This module only names the package; Django imports ``.base``.
"""
