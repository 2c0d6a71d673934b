"""Handlers shipped with matrixjobs, usable from `[targets.X] handler = "NAME"`."""
