"""Operator commands: `matrixjobs init` (a starter config) and `matrixjobs doctor` (checks)."""
