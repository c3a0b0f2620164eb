"""Alembic migration scripts for the result tables, configured by :mod:`celery_sqlresults.migrate`.

No ``alembic.ini``: the configuration is built in code, the table names and
schemas come from the backend's settings (``config.attributes["tables"]``)
and the revision is kept in our own version table, so an application's own
Alembic history (``alembic_version``) is never touched.

Every revision module sets ``additive``: ``True`` when it only adds (tables,
nullable columns, indexes) and so may run automatically at start-up.
"""
