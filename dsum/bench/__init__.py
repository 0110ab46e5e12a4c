"""`dsum bench`: how fast dsum fine-tunes and evaluates next to the two usual ways of doing it
(`three_ways`), and against absolute goals on one GPU (`goals`); BENCHMARKS.md gives the method."""

