"""The fault and bad-input suite (issue 10): each row of the table injects one fault or bad input
into the real system (real mosquitto, real controller, real agents as processes, loopback only)
and checks what must hold. The injection and measurement live in ``drills/`` so that
``bench/faults.py`` prints the same figures the tests assert on."""
