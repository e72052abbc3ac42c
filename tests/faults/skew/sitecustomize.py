"""A wall clock running DTSD_TEST_CLOCK_SKEW seconds ahead, for every Python process
started with this directory first on PYTHONPATH (a dtsd master and all its children).

What dtsd reads as the time of day (`time.time`, `time.time_ns`, `datetime.now`,
`datetime.utcnow`) is shifted; monotonic clocks, which measure intervals, are not (as
with a host whose clock is set wrong). libfaketime would do this for the whole process,
but its 0.9.10 (Debian 12) hangs Python 3.11's timed waits, or makes `time.sleep` fail
with EINVAL when told to leave the monotonic clocks alone.
"""

import datetime as _datetime
import os
import time as _time

_SKEW = float(os.environ.get("DTSD_TEST_CLOCK_SKEW", "0") or 0)

if _SKEW:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _SKEW
    _time.time_ns = lambda: _real_time_ns() + int(_SKEW * 1e9)
    _offset = _datetime.timedelta(seconds=_SKEW)
    _Real = _datetime.datetime

    class _AnyDatetime(type):
        """Every datetime (from PostgreSQL, say) is an instance of the shifted class."""

        def __instancecheck__(cls, instance):
            return isinstance(instance, _Real)

        def __subclasscheck__(cls, subclass):
            return issubclass(subclass, _Real)

    class _SkewedDatetime(_Real, metaclass=_AnyDatetime):
        @classmethod
        def now(cls, tz=None):
            return _Real.now(tz) + _offset

        @classmethod
        def utcnow(cls):
            return _Real.utcnow() + _offset

        @classmethod
        def today(cls):
            return _Real.today() + _offset

    _datetime.datetime = _SkewedDatetime
