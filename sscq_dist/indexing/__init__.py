"""Indexing: FAISS fast-scan parts from learned codebooks, snapshots, the index lock.

Stages of a reindex (`reindex.py`): plan -> build (worker side) -> check ids -> publish;
`formats.py` holds the on-disk formats that the writer and every reader import.
"""
