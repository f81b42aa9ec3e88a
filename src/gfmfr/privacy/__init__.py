"""Privacy: user-level differential privacy for the federation (:mod:`.dp`), its accounting with
Google's ``dp-accounting`` (:mod:`.accounting`), and the honest-but-curious server's attacks that
measure what uploads reveal (:mod:`.audit`, run by ``benchmarks/privacy_audit.py``)."""
