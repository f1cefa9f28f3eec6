"""The run report: `registry` (what each stage shows), `summary` (the opening facts), `run` (a run's declared
files), `plots` (figures, also drawn by stages) and `html` (the page)."""
