"""The services: each orchestrates the pure core over PostgreSQL (``pg/``) for one concern,
and is called alike by the HTTP layer (``http/``) and the command line (``cli/``)."""
