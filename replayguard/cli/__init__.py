"""The command line (``replayguard``): ``main`` parses and runs serve, migrate and token;
each other module adds its subcommands (``register``) and calls the same services as the
HTTP API, or, for the operator commands, the HTTP API itself (``service_client``)."""
