"""A program's maps as DataFrames: counts, histograms, stacks and globals (issue 15)."""
