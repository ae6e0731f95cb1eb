"""Helpers for the Django side: sending commands from consumers without losing them.

Under ``manage.py runworker`` a consumer that raises loses every message already queued for it
(channels' worker prefetches). A plain ``channel_layer.send`` raises ``ChannelFull`` as soon as a
gateway's command channel holds ``capacity`` messages, which happens whenever consumers produce
commands faster than the transport carries them out. :func:`send_command` waits for room instead,
with backoff, up to a deadline, and only then raises.
"""

from core.service import send_command

__all__ = ["send_command"]
