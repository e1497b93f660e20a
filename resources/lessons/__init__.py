"""Lessons: guided sequences of runs (core/lessons.py reads them); data only."""
