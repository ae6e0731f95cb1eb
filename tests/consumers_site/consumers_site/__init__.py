"""A Django site whose consumers are the generic ones of gateways/*/consumers.py
(tests/gateways/test_consumers_end_to_end.py runs it under ``manage.py runworker``)."""
