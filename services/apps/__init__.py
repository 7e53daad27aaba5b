"""Applications that assemble the services: the ``tessera`` command, the demo, the in-process federation.

They sit above the services (they import :mod:`tessera.curator` and :mod:`tessera.participant`); nothing in
the library (``shared/tessera``) imports them or the services.
"""
