"""`matrixjobs demo`: the whole thing on one machine, with a throwaway homeserver."""
