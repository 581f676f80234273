"""Serving: partitions of a snapshot merged into one in-memory index each (partition.py),
balanced by bytes (planner.py), served by a Ray Serve application with a web page (app.py)."""
