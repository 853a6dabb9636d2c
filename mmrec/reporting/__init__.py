"""``mmrec report``: what a run directory holds, gathered (:mod:`.collect`), drawn (:mod:`.figures`) and
written as one self-contained HTML page (:mod:`.html`)."""
