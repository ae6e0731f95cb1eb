"""Test fakes that only make sense in a checkout of channels-gateways (not installed).

:mod:`core.testing` is the installed, documented testing API (docs/testing.md); what is here
stands in for one gateway's far side in this repository's tests and benchmarks:

* :mod:`tests.support.dns`    :class:`~tests.support.dns.DnsServer`: SPF, DKIM and DMARC records
  for the email gateway's sender authentication
"""
