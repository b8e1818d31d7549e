"""Nipype workflows composing the smoulder library (installed as ``smoulder.pipelines``)."""
