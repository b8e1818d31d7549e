"""The QA report: one self-contained HTML page per subject, a cohort index, and the review
server that saves raters' lesion decisions (``smoulder report``, ``smoulder review``)."""
