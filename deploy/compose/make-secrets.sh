#!/bin/sh
# Creates ./secrets/db_password and ./secrets/database_url for docker-compose.yml, once.
# The service runs as uid 10001 and must read database_url; nobody else may: the service
# refuses a secret file another user owns or others can read. Only root can give the file
# to uid 10001, so this runs as root (sudo ./make-secrets.sh).
set -eu
if [ "$(id -u)" -ne 0 ]; then
    echo "make-secrets.sh: run it as root (sudo $0): secrets/database_url must belong to uid 10001," \
         "the service's user, with mode 0600, and only root can give it that owner" >&2
    exit 1
fi
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
if [ ! -f secrets/db_password ]; then
    python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > secrets/db_password
fi
if [ ! -f secrets/database_url ]; then
    printf 'postgresql://replayguard:%s@postgres:5432/replayguard\n' "$(cat secrets/db_password)" > secrets/database_url
fi
chown 10001 secrets/database_url
chmod 0600 secrets/database_url
echo "secrets ready in $(pwd)/secrets"
