"""After a recorded recovery (CONTRACT §10), a secret whose enrolment the lost range held
too, enrolled again, accepts none of the codes the lost range may have accepted: a TOTP
credential made after a recovery starts at the step of the latest recovery's time plus
the drift window, as the recovery raised every credential the database knew. Over real
PostgreSQL, the database restored in place as tests/integration/test_restore_in_place.py does."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pyotp

from replayguard.settings import Secret
from tests.conftest import Api, FakeClock, cli_env, run_cli
from tests.integration.db_restore import restore, scratch_dbs, settled, snapshot
from tests.integration.test_restore_in_place import QUIET, after_next_check, nonce, ready
from tests.waiting import until

__all__ = ["scratch_dbs"]  # a fixture


async def _refused(api: Api) -> bool:
    status, body = await settled(lambda: nonce(api, secrets.token_hex(8)))
    return status == 503 and body.get("error", {}).get("code") == "ledger_rollback"


def _accept_rollback(dsn: str, data_dir: Path, reason: str) -> dict[str, Any]:
    env = cli_env(REPLAYGUARD_DATABASE_URL=dsn, REPLAYGUARD_DATA_DIR=str(data_dir))
    done = run_cli("ledger", "accept-rollback", "--reason", reason, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(orjson.loads(done.stdout))


async def test_a_totp_secret_enrolled_in_the_lost_range_and_enrolled_again_after_the_recovery_refuses_its_used_code(
        scratch_dbs: list[str], fresh_database: Callable[[], Any], api_factory: Callable[..., Any],
        tmp_path: Path) -> None:
    """A TOTP secret enrolled and used in the range a restore lost is unknown to the
    recovered database (the recovery raised only the credentials it knew). The admin enrols
    it again after ``accept-rollback`` (the authenticator app still holds it): its
    credential starts at the step of the recovery's time plus the drift window, so the code
    the lost range accepted, still inside the drift window, is refused as reused; once
    that window has passed (service time), a new code of the secret is accepted."""
    clock = FakeClock(time.time())
    dsn = await fresh_database()
    api = await api_factory(clock=clock, database_url=Secret(dsn), **QUIET)
    for _ in range(3):
        assert (await nonce(api, secrets.token_hex(8)))[1]["decision"] == "accept"
    scratch_dbs.append(copy := await snapshot(dsn))
    await until(lambda: ready(api), "the service to be ready again", timeout=15)
    secret = pyotp.random_base32()
    status, _ = await settled(lambda: api.post("/v1/principals/dora/tokens", {"type": "totp", "secret": secret},
                                               role="admin"))
    assert status == 201
    login = {"vm_id": "vm-1", "principal": "dora", "otp": pyotp.TOTP(secret).at(clock.now)}
    status, body = await api.post("/v1/otp/verify", login)
    assert (status, body["decision"]) == (200, "accept"), body

    await restore(dsn, copy, scratch_dbs)
    await until(lambda: _refused(api), "the restore to be refused", timeout=30)
    await after_next_check(api)
    assert _accept_rollback(dsn, tmp_path / "data", "restored a copy")["serving"] is True
    recovered = time.time()
    await until(lambda: ready(api), "decisions served after the recovery", timeout=30)
    await api.enroll("dora", type="totp", secret=secret)  # the enrolment the restore lost, made again

    status, body = await settled(lambda: api.post("/v1/otp/verify", login))
    assert (status, body["decision"], body["reason"]) == (200, "reject", "reused"), body
    clock.now = recovered + (api.runtime.settings.totp_drift_steps + 2) * 30
    later = {**login, "otp": pyotp.TOTP(secret).at(clock.now)}
    status, body = await api.post("/v1/otp/verify", later)
    assert (status, body["decision"]) == (200, "accept"), body
