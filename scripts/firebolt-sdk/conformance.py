"""Drives the official Firebolt Python SDK against the protocol test server (a second
opinion on the server: where the SDK and the server disagree, the server is wrong).
Run by tests/firebolt/sdk.rs with the venv of scripts/firebolt-sdk/venv.sh; prints one
JSON report on stdout, which the Rust test asserts together with what the server saw.

Environment: FB_MODE (core | cloud), FB_URL (Core's URL, or the API URL for cloud),
FB_DATABASE, and for cloud FB_CLIENT_ID, FB_CLIENT_SECRET, FB_ACCOUNT, FB_ENGINE.
"""

import json
import os
import socket
import sys


def error_of(e):
    return {"type": type(e).__name__, "message": str(e)}


def core():
    from firebolt.client.auth import FireboltCore
    from firebolt.db import connect

    url = os.environ["FB_URL"]
    database = os.environ["FB_DATABASE"]
    report = {}
    conn = connect(auth=FireboltCore(), url=url, database=database)
    cur = conn.cursor()
    cur.execute("CREATE TABLE sdk_t (id BIGINT NOT NULL, name TEXT NULL) PRIMARY INDEX id")
    cur.execute("INSERT INTO sdk_t (id, name) VALUES (1, 'one'), (2, 'two')")
    report["insert_rowcount"] = cur.rowcount
    cur.execute("SELECT id, name FROM sdk_t ORDER BY id")
    report["rows"] = [list(r) for r in cur.fetchall()]
    report["columns"] = [d.name for d in cur.description]
    report["python_types"] = [type(v).__name__ for v in report["rows"][0]]
    cur.execute("SELECT 1")
    report["select_1"] = cur.fetchone()[0]

    # A transaction that commits, and one that rolls back its DDL.
    tconn = connect(auth=FireboltCore(), url=url, database=database, autocommit=False)
    tcur = tconn.cursor()
    tcur.execute("INSERT INTO sdk_t (id, name) VALUES (3, 'three')")
    report["in_transaction"] = tconn.in_transaction
    tconn.commit()
    report["in_transaction_after_commit"] = tconn.in_transaction
    tcur.execute("CREATE TABLE sdk_rolled_back (a INTEGER NOT NULL) PRIMARY INDEX a")
    tconn.rollback()
    report["in_transaction_after_rollback"] = tconn.in_transaction
    tconn.close()

    # Failing statements: a missing table, and what Firebolt refuses.
    failures = {}
    for name, sql in [
        ("missing_table", "SELECT * FROM sdk_missing"),
        ("nullable_primary_index", "CREATE TABLE sdk_bad (id BIGINT NULL) PRIMARY INDEX id"),
        ("commit_outside_transaction", "COMMIT"),
    ]:
        try:
            cur.execute(sql)
            failures[name] = None
        except Exception as e:  # the SDK's own exception types are reported by name
            failures[name] = error_of(e)
    report["failures"] = failures
    conn.close()
    return report


def cloud():
    from firebolt.client.auth import ClientCredentials
    from firebolt.db import connect

    # The SDK derives the token host from the API host by replacing its first label
    # (api.X -> id.X): the test hosts are names under .fbtest, resolved to the server.
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".fbtest"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = resolve
    report = {}
    try:
        conn = connect(
            auth=ClientCredentials(os.environ["FB_CLIENT_ID"], os.environ["FB_CLIENT_SECRET"]),
            account_name=os.environ["FB_ACCOUNT"],
            engine_name=os.environ["FB_ENGINE"],
            database=os.environ["FB_DATABASE"],
            api_endpoint=os.environ["FB_URL"],
            disable_cache=True,
        )
    except Exception as e:
        report["connect_error"] = error_of(e)
        return report
    report["engine_url"] = conn.engine_url
    report["init_parameters"] = {k: str(v) for k, v in conn.init_parameters.items()}
    try:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        report["select_1"] = cur.fetchone()[0]
    except Exception as e:
        report["select_error"] = error_of(e)
    return report


if __name__ == "__main__":
    mode = os.environ.get("FB_MODE", "core")
    result = core() if mode == "core" else cloud()
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
