"""`dsum bench`: how fast dsum fine-tunes and evaluates next to the two usual ways of doing it
(`three_ways`), and against absolute goals on one GPU (`goals`); BENCHMARKS.md gives the method."""

# tests/test_features.py holds dsum's token counts and these together; it imports them from here.
from dsum.bench.peers import token_counts  # noqa: F401
