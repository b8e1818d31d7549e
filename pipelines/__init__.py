"""Nipype workflows composing the smoulder library (installed as ``smoulder.pipelines``).

* :mod:`~smoulder.pipelines.session` — ``init_session_wf``: one session, inputs to derivatives;
* :mod:`~smoulder.pipelines.subject` — ``init_subject_wf``: what needs two or more sessions;
* :mod:`~smoulder.pipelines.participant` — ``init_participant_wf``: every selected subject;
* :mod:`~smoulder.pipelines.interfaces` — one Nipype interface per library function, and the
  derivatives sink;
* :mod:`~smoulder.pipelines.execution` — plugin settings, progress, crash reports, timings.
"""
