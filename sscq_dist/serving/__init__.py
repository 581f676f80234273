"""Serving: partitions of a snapshot merged into one in-memory index each (partition.py),
placed stably by rendezvous hashing (planner.py), swapped incrementally (holder.py), served by a Ray Serve application with a web page (app.py)."""
