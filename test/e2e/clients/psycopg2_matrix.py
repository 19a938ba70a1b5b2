"""Client-matrix driver for Python psycopg2 (run by test/e2e/client-matrix.test.ts).

Run with Debian's interpreter (/usr/bin/python3, which has python3-psycopg2). Connection details
come from the environment (XM_*): libpq connects to hostaddr=127.0.0.1 and sends
host=<endpoint>.<domain> as SNI, verifying the proxy's certificate with the stack's CA
(sslmode=verify-full). Every step runs on its own and reports what it observed (or the error it
got) in one JSON object on stdout; the test asserts on the values.

psycopg2 interpolates parameters on the client and never uses the extended protocol, so the
prepared statement here is a server-side SQL PREPARE executed with bound parameters.
"""
import io
import json
import os
import select
import threading
import time

import psycopg2
import psycopg2.extensions

ENV = os.environ
PREFIX = ENV["XM_PREFIX"]
DSN = (
    f"host={ENV['XM_ENDPOINT']}.{ENV['XM_DOMAIN']} hostaddr=127.0.0.1 port={ENV['XM_PORT']} "
    f"user={ENV['XM_USER']} password={ENV['XM_PASSWORD']} dbname={ENV['XM_DATABASE']} "
    f"sslmode=verify-full sslrootcert={ENV['XM_CA']} connect_timeout=30 application_name=xm-psycopg2"
)

out = {"driver": f"psycopg2 {psycopg2.__version__}, libpq {psycopg2.extensions.libpq_version()}"}
timings = {}


def connect(autocommit=True):
    c = psycopg2.connect(DSN)
    c.autocommit = autocommit
    return c


def step(name):
    def run(fn):
        t0 = time.monotonic()
        try:
            out[name] = fn()
        except Exception as e:  # report, the test asserts
            out[name] = {"error": f"{type(e).__name__}: {e}".strip(), "sqlstate": getattr(e, "pgcode", None)}
        timings[name] = round((time.monotonic() - t0) * 1000)
        return fn
    return run


@step("connect")
def _():
    c = connect()
    try:
        cur = c.cursor()
        cur.execute("SELECT current_user, current_database()")
        user, db = cur.fetchone()
        return {
            "user": user,
            "database": db,
            "ssl_in_use": c.info.ssl_in_use,
            "ssl_protocol": c.info.ssl_attribute("protocol"),
        }
    finally:
        c.close()


@step("prepared")
def _():
    c = connect()
    try:
        cur = c.cursor()
        cur.execute("PREPARE xm_py(int, text) AS SELECT $1 * 2, $2 || '!', length($2), $2 IS NULL")
        rows = []
        for n, s in ((21, "héllo wörld"), (-7, "it's")):
            cur.execute("EXECUTE xm_py(%s, %s)", (n, s))
            rows.append(list(cur.fetchone()))
        cur.execute("SELECT name, statement, from_sql FROM pg_prepared_statements ORDER BY name")
        return {"rows": rows, "server_statements": [list(r) for r in cur.fetchall()]}
    finally:
        c.close()


@step("tx")
def _():
    t = f"{PREFIX}_tx"
    c = connect(autocommit=False)
    try:
        cur = c.cursor()
        cur.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        c.commit()
        # psycopg2 opens the transaction (BEGIN) itself before the first statement.
        cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (1, "one"))
        cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (2, "two"))
        c.commit()
        cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (3, "three"))
        cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (4, "four"))
        cur.execute(f"SELECT count(*) FROM {t}")
        inside = cur.fetchone()[0]
        c.rollback()
        cur.execute(f"SELECT id, v FROM {t} ORDER BY id")
        rows = [list(r) for r in cur.fetchall()]
        c.rollback()
        return {"inside_before_rollback": inside, "rows": rows}
    finally:
        c.close()


@step("copy")
def _():
    t = f"{PREFIX}_copy"
    c = connect()
    try:
        cur = c.cursor()
        cur.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, name text, note text, amount numeric)")
        with open(ENV["XM_COPY_IN"], "rb") as f:
            cur.copy_expert(f"COPY {t} FROM STDIN", f, size=64 * 1024)
        copied_in = cur.rowcount
        buf = io.BytesIO()
        cur.copy_expert(f"COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT", buf)
        copied_out = cur.rowcount
        with open(ENV["XM_COPY_OUT"], "wb") as f:
            f.write(buf.getvalue())
        return {"in": copied_in, "out": copied_out}
    finally:
        c.close()


@step("notify")
def _():
    ch = f"{PREFIX}_chan"
    listener, notifier = connect(), connect()
    try:
        listener.cursor().execute(f"LISTEN {ch}")
        payload = f"psycopg2 payload ✓ {time.time_ns()}"
        ncur = notifier.cursor()
        ncur.execute("SELECT pg_backend_pid(), pg_notify(%s, %s)", (ch, payload))
        notifier_pid = ncur.fetchone()[0]
        deadline = time.monotonic() + 10
        while not listener.notifies and time.monotonic() < deadline:
            if select.select([listener], [], [], 0.5)[0]:
                listener.poll()
        return {
            "sent": payload,
            "received": [{"channel": n.channel, "payload": n.payload, "from_notifier": n.pid == notifier_pid} for n in listener.notifies],
        }
    finally:
        listener.close()
        notifier.close()


@step("cancel")
def _():
    c, watcher = connect(), connect()
    try:
        cur = c.cursor()
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        result = {}

        def sleep():
            try:
                cur.execute("SELECT pg_sleep(30)")
                result["completed"] = True
            except psycopg2.Error as e:
                result["failed_at"] = time.monotonic()
                result["sqlstate"] = e.pgcode
                result["message"] = str(e).strip()

        th = threading.Thread(target=sleep)
        th.start()
        wcur = watcher.cursor()
        active = False
        deadline = time.monotonic() + 10
        while not active and time.monotonic() < deadline:
            wcur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND state = 'active' AND query = 'SELECT pg_sleep(30)'",
                (pid,),
            )
            active = wcur.fetchone()[0] == 1
            if not active:
                time.sleep(0.02)
        sent_at = time.monotonic()
        c.cancel()  # libpq PQcancel: a CancelRequest to the address the session is connected to
        th.join(35)
        failed_at = result.pop("failed_at", None)
        if failed_at is not None:
            result["ms"] = (failed_at - sent_at) * 1000
        result["was_active"] = active
        cur.execute("SELECT 'still here'")  # the session survives a cancel
        result["after"] = cur.fetchone()[0]
        return result
    finally:
        c.close()
        watcher.close()


out["timings_ms"] = timings
print(json.dumps(out, default=str))
