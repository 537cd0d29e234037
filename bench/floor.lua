-- wrk script for the HTTP floor (bench/floor_app.py): the same kind of POST the decision
-- phases send, with a fixed body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer rg_floor_not_a_token"
wrk.body = '{"vm_id":"vm-17","scope":"ssh:alice","nonce":"3f9a1c7e5b2d4f6a8c0e1a3b5d7f9e2c","ttl_s":300}'
