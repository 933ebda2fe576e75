"""Where runs leave their results on disk: run records (read, written atomically, locked while their run runs),
the provenance a record carries, and atomic file writes.

The low layer of the house: it knows files and JSON, not suites, tasks or tables, so that every layer that writes
or reads a record (a task setting a damaged checkpoint aside, the trainer's resumable state, the runner, the
tables) imports it from below.
"""
