"""The split deployment's roles, each its own process: `tinkerd api`, `tinkerd trainer`, `tinkerd sampler`.

They share only the ledger (PostgreSQL) and the checkpoint storage. `tinkerd serve` (server.py) is all three in
one process over SQLite. roles.api never imports torch or the engine.
"""
