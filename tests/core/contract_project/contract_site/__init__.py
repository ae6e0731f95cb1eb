"""A Django project whose one consumer does what a message asks (sleep, fail, kill its process,
group_send, touch the database) and records every handling in Redis, so the streams layer's
contract can be checked through real ``manage.py runworker`` processes."""
