#!/usr/bin/env python
"""Django's command line for the example (``python manage.py migrate`` through pgbroker when
PGBROKER_URL is set, straight to DATABASE_URL otherwise)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clicks.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
