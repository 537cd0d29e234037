#!/bin/sh
# Creates ./secrets/db_password and ./secrets/database_url for docker-compose.yml, once.
# The service runs as uid 10001 and must read database_url; nobody else needs to.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
if [ ! -f secrets/db_password ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > secrets/db_password
fi
if [ ! -f secrets/database_url ]; then
    printf 'postgresql://replayguard:%s@postgres:5432/replayguard\n' "$(cat secrets/db_password)" > secrets/database_url
fi
chown 10001 secrets/database_url 2>/dev/null || chmod 0644 secrets/database_url
echo "secrets ready in $(pwd)/secrets"
