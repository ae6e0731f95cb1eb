#!/usr/bin/env python
"""``manage.py runworker jobs`` for tests/core/test_streams_contract.py (see contract_site)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "contract_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
