"""Who may call what, written down by hand: route and caller → the status the contract expects.

This table is the tests' own statement of the contract (sections 3-8), kept apart from the
product's route table on purpose: a test that takes the expected roles from the code
under test cannot catch a route that lets the wrong role in. Every route the service
registers and every operation of its OpenAPI document must have a row here
(``test_access_control.test_matrix_covers_every_registered_route_and_operation``).

Each row is one request: a concrete path and, for methods with a body, the JSON body
``{}`` (so an allowed caller gets past authorisation and is stopped by validation,
which makes the status tell "let in" from "kept out"). The columns are the callers:
``none`` sends no ``Authorization`` header; the others send a live token of that role.
"""

from __future__ import annotations

from dataclasses import dataclass

CALLERS = ("none", "callout", "hypervisor", "analyst", "witness", "admin")

# Values that the requests put in the path parameters; none of them exists.
PRINCIPAL = "matrix-nobody"
TOKEN_ID = "tok_matrix-nobody"
ALERT_ID = "999999999999"  # alert ids count up from 1 in the run's shared database
VM_ID = "matrix-vm"

OPEN = {"none": 200, "callout": 200, "hypervisor": 200, "analyst": 200, "witness": 200, "admin": 200}


def _only(allowed: dict[str, int]) -> dict[str, int]:
    """A protected row: 401 without a token, 403 for every role not named, as given otherwise."""
    row = {"none": 401, "callout": 403, "hypervisor": 403, "analyst": 403, "witness": 403, "admin": 403}
    row.update(allowed)
    return row


@dataclass(frozen=True)
class Row:
    method: str
    template: str  # the route as the service declares it (aiohttp / OpenAPI spelling)
    path: str  # the concrete path requested
    expected: dict[str, int]
    in_openapi: bool = True  # an API operation of /v1/openapi.json (the console's static files are not)


MATRIX: tuple[Row, ...] = (
    # Section 4: decisions, role callout (admin may do everything).
    Row("POST", "/v1/otp/verify", "/v1/otp/verify", _only({"callout": 400, "admin": 400})),
    Row("POST", "/v1/nonces/consume", "/v1/nonces/consume", _only({"callout": 400, "admin": 400})),
    Row("POST", "/v1/radius/authenticate", "/v1/radius/authenticate",
        _only({"callout": 400, "admin": 400})),
    # Section 5: hypervisor events.
    Row("POST", "/v1/hypervisor/events", "/v1/hypervisor/events", _only({"hypervisor": 400, "admin": 400})),
    # Section 6: analysts.
    Row("GET", "/v1/alerts", "/v1/alerts", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/alerts/stream", "/v1/alerts/stream", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/alerts/{id}", f"/v1/alerts/{ALERT_ID}", _only({"analyst": 404, "admin": 404})),
    Row("POST", "/v1/alerts/{id}/acknowledge", f"/v1/alerts/{ALERT_ID}/acknowledge",
        _only({"analyst": 404, "admin": 404})),
    Row("GET", "/v1/vms", "/v1/vms", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/vms/{vm_id}/timeline", f"/v1/vms/{VM_ID}/timeline", _only({"analyst": 404, "admin": 404})),
    Row("GET", "/v1/ledger", "/v1/ledger", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/ledger/verify", "/v1/ledger/verify", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/ledger/checkpoints", "/v1/ledger/checkpoints", _only({"analyst": 200, "admin": 200})),
    Row("GET", "/v1/ledger/public-key", "/v1/ledger/public-key", _only({"analyst": 200, "admin": 200})),
    # Section 7: enrollment, admin only.
    Row("POST", "/v1/principals/{principal}/tokens", f"/v1/principals/{PRINCIPAL}/tokens",
        _only({"admin": 201})),  # every field has a default: a TOTP token
    Row("GET", "/v1/principals/{principal}/tokens", f"/v1/principals/{PRINCIPAL}/tokens",
        _only({"admin": 200})),
    Row("DELETE", "/v1/principals/{principal}/tokens/{token_id}",
        f"/v1/principals/{PRINCIPAL}/tokens/{TOKEN_ID}", _only({"admin": 404})),
    Row("POST", "/v1/vms/{vm_id}/clear", f"/v1/vms/{VM_ID}/clear", _only({"admin": 400})),
    Row("GET", "/v1/principals", "/v1/principals", _only({"admin": 200})),
    Row("POST", "/v1/principals/{principal}/unlock", f"/v1/principals/{PRINCIPAL}/unlock",
        _only({"admin": 200})),  # the fixture enrolled the principal; the note is optional
    Row("GET", "/v1/status", "/v1/status", _only({"analyst": 200, "admin": 200})),
    # Section 10: the witness endpoint another deployment writes its checkpoints to.
    Row("PUT", "/v1/witness/{deployment_id}", "/v1/witness/matrixdeployment",
        _only({"witness": 400, "admin": 400})),
    Row("GET", "/v1/witness/{deployment_id}", "/v1/witness/matrixdeployment",
        _only({"witness": 404, "admin": 404})),  # nothing held for it
    # Section 8: operations, open to anyone.
    Row("GET", "/healthz", "/healthz", OPEN),
    Row("GET", "/readyz", "/readyz", OPEN),
    Row("GET", "/metrics", "/metrics", OPEN),
    Row("GET", "/v1/openapi.json", "/v1/openapi.json", OPEN),
    # The console's static files are open (the analyst pastes a token into the page, which
    # sends it to the API alone); /console redirects to /console/, and the client follows.
    Row("GET", "/console", "/console", OPEN, in_openapi=False),
    Row("GET", "/console/", "/console/", OPEN, in_openapi=False),
    Row("GET", "/console/{name}", "/console/app.js", OPEN, in_openapi=False),
)


def row_for(method: str, template: str) -> Row:
    """The matrix row of one route; KeyError names a route the matrix lacks."""
    for row in MATRIX:
        if row.method == method and row.template == template:
            return row
    raise KeyError(f"{method} {template} has no row in tests/api/access_matrix.py")


def allowed(method: str, template: str, role: str) -> bool:
    """Whether the matrix lets this role past authorisation on this route."""
    return row_for(method, template).expected[role] not in (401, 403)
