"""The leader services: the background work of ``pgsched scheduler`` (and of every worker, unless
``--no-scheduler``), one module each, run by one shared loop.

Leadership, in prose (as River writes it before the code): every pass of
every service is a short transaction that begins with
``pg_try_advisory_xact_lock(LEADER_KEY)``. Whoever gets the lock leads that
pass; the others skip it. The lock is transaction-scoped, so it works behind
a transaction-mode pooler and vanishes the moment a leader's connection
drops: another process leads the next pass. A leader frozen mid-pass (SIGSTOP,
a stalled VM) would keep its connection and so the lock; each pass therefore
sets ``idle_in_transaction_session_timeout`` to one lease for its own
transaction, and the server ends a pass idle that long, releasing the lock for
the others (the thawed process reconnects). Correctness never rests on the
lock: every statement a service runs is idempotent and fenced on the state it
expects (``sql/0002_scheduler.sql``), and schedule slots are unique, so two
leaders at once waste work and never duplicate it.

- ``service``: the shape every service shares (``Service.run_once``, ``Pass``, the lock);
- ``materializer``: due schedule slots become jobs;
- ``promoter``: ``scheduled`` jobs whose time came become ``queued``;
- ``rescuer``: jobs of workers whose lease expired go back to ``queued``;
- ``pruner``: finished jobs, old history and dead workers are deleted;
- ``loop``: ``Maintenance``, which runs them all on their intervals.
"""
