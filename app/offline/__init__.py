"""Offline side of the farm: synthetic impression logs and model training/export."""
