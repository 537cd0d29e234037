"""The PostgreSQL adapter: connections, the schema's migrations, the embedded server, and
the group-commit appender that hands decisions to ``rg_decide``."""
