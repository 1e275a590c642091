"""The attended-chunk reader: plan (pure, ``plan``), execute (async, ``reader``), the reader in a
child process (``process``), its one set of settings (``settings``) and the one source factory
with the manifest -> split -> source recipe (``source``).

Imports ``store`` and ``models``; never ``ingest``, ``synth``, ``track`` or ``train``.
"""
