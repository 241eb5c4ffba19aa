"""Analyses of proposals and view pairs: coverage statistics (``coverage``) and pictures (``pictures``,
imported on demand since it pulls in matplotlib)."""

from objcrop.analysis.coverage import CoverageResult, UnionArea, coverage, coverage_table

__all__ = ["CoverageResult", "UnionArea", "coverage", "coverage_table"]
