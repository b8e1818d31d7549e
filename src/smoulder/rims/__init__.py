"""Paramagnetic rim lesions (PRL): how likely each lesion carries an iron rim, with evidence.

Everything is measured in the susceptibility image's native (GRE) grid: a lesion's FLAIR mask is
mapped into it through the inverse of the session's GRE → FLAIR rigid, never the other way.

Modules:

* ``patches`` — lesion masks and instance labels in the GRE grid, the field-of-view check, a
  cubic box around a lesion, and the network's 4-channel patch (padded at the image border,
  channels normalised as the patch contract says);
* ``rules`` — the rule-based detector and its companion measures: rim, core and perilesional
  white-matter regions, mean χ of each, rim coverage by angular sector, the raters' consensus
  check (≥ 2/3 of the edge on ≥ 2 consecutive slices) and the central-vein sign;
* ``sign`` — the phase/χ sign convention, from the sidecar and checked on the data;
* ``tissue`` — lesion tissue beyond the rim: T1 black holes and quantitative T1 from MP2RAGE;
* ``network``, ``calibration``, ``train`` — the classifier, its calibrated probability and
  operating points, and its training and site fine-tuning.

Pure functions on arrays and tables; reading and writing derivatives is the caller's (the
pipeline, the report, a thin ``command``).
"""
