"""The controller's HTTP control API (FastAPI), versioned under ``/api/v1``.

Build it with :func:`edgefed.cloud.api.app.create_app`; nothing is created at import.
"""
