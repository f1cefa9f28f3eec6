"""Statistics primitives shared by every analysis: input checks, KL, bootstrap, multiple testing."""
