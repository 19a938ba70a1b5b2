// Client-matrix driver for pgJDBC (run by test/e2e/client-matrix.test.ts):
//   java -cp /usr/share/java/postgresql.jar JdbcMatrix.java
// Connection details come from the environment (XM_*). Every step runs on its own and reports what
// it observed (or the error it got) in one JSON object on stdout; the test asserts on the values.
//
// pgJDBC cannot send an SNI name different from the address it connects to, so it connects to
// 127.0.0.1 and names the endpoint in the startup `options` parameter (`endpoint=<id>`). TLS is
// verified against the stack's CA (sslmode=verify-full: the certificate covers 127.0.0.1).

import java.io.StringReader;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcMatrix {
  static String env(String name) {
    String v = System.getenv(name);
    if (v == null) throw new IllegalStateException("missing env " + name);
    return v;
  }

  static final String PREFIX = env("XM_PREFIX");

  static String url() {
    return "jdbc:postgresql://127.0.0.1:" + env("XM_PORT") + "/" + env("XM_DATABASE");
  }

  static Properties props(String sslmode) {
    Properties p = new Properties();
    p.setProperty("user", env("XM_USER"));
    p.setProperty("password", env("XM_PASSWORD"));
    p.setProperty("options", "endpoint=" + env("XM_ENDPOINT"));
    p.setProperty("sslmode", sslmode);
    p.setProperty("sslrootcert", env("XM_CA"));
    p.setProperty("connectTimeout", "30");
    // Server-side prepared statements from the first execution (the default waits for the 5th).
    p.setProperty("prepareThreshold", "1");
    p.setProperty("ApplicationName", "xm-jdbc");
    return p;
  }

  static Connection open() throws SQLException {
    return DriverManager.getConnection(url(), props("verify-full"));
  }

  static List<List<Object>> rows(ResultSet rs) throws SQLException {
    List<List<Object>> out = new ArrayList<>();
    int n = rs.getMetaData().getColumnCount();
    while (rs.next()) {
      List<Object> row = new ArrayList<>();
      for (int i = 1; i <= n; i++) row.add(rs.getObject(i));
      out.add(row);
    }
    return out;
  }

  static List<List<Object>> query(Connection c, String sql) throws SQLException {
    try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
      return rows(rs);
    }
  }

  static Map<String, Object> error(Throwable e) {
    Map<String, Object> m = new LinkedHashMap<>();
    m.put("error", String.valueOf(e));
    if (e instanceof SQLException) m.put("sqlstate", ((SQLException) e).getSQLState());
    return m;
  }

  interface Step {
    Object run() throws Exception;
  }

  static final Map<String, Object> TIMINGS = new LinkedHashMap<>();

  static void step(Map<String, Object> out, String name, Step s) {
    long t0 = System.nanoTime();
    try {
      out.put(name, s.run());
    } catch (Throwable e) {
      out.put(name, error(e));
    }
    TIMINGS.put(name, Math.round((System.nanoTime() - t0) / 1e6));
  }

  public static void main(String[] args) throws Exception {
    Class.forName("org.postgresql.Driver");
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("driver", org.postgresql.util.DriverInfo.DRIVER_FULL_NAME);

    // (a) connect over verified TLS, endpoint from options
    step(out, "connect", () -> {
      try (Connection c = open()) {
        List<Object> r = query(c, "SELECT current_user, current_database(), current_setting('server_version_num')::int").get(0);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("user", r.get(0));
        m.put("database", r.get(1));
        m.put("server_version_num", r.get(2));
        return m;
      }
    });
    // The proxy requires TLS: the same connection without it must be refused.
    step(out, "plaintext", () -> {
      try (Connection c = DriverManager.getConnection(url(), props("disable"))) {
        return "connected without TLS";
      }
    });

    // (b) a server-side prepared statement with parameters (extended protocol, named statement)
    step(out, "prepared", () -> {
      try (Connection c = open()) {
        Map<String, Object> m = new LinkedHashMap<>();
        List<List<Object>> results = new ArrayList<>();
        try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2 AS doubled, ?::text || '!' AS bang, length(?::text) AS len, ?::text IS NULL AS isnull")) {
          int[] ns = {21, -7};
          String[] ss = {"héllo wörld", "it's"};
          for (int i = 0; i < 2; i++) {
            ps.setInt(1, ns[i]);
            ps.setString(2, ss[i]);
            ps.setString(3, ss[i]);
            ps.setNull(4, java.sql.Types.VARCHAR);
            try (ResultSet rs = ps.executeQuery()) { results.addAll(rows(rs)); }
          }
          // The statement is prepared on the server (pgJDBC names it S_<n>), not interpolated.
          m.put("server_statements", query(c, "SELECT name, statement, from_sql FROM pg_prepared_statements ORDER BY name"));
        }
        m.put("rows", results);
        return m;
      }
    });

    // (c) transactions: a committed one and a rolled-back one
    step(out, "tx", () -> {
      try (Connection c = open()) {
        String t = PREFIX + "_tx";
        try (Statement s = c.createStatement()) { s.execute("CREATE TABLE " + t + " (id int PRIMARY KEY, v text)"); }
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + t + " VALUES (?, ?)")) {
          ps.setInt(1, 1); ps.setString(2, "one"); ps.executeUpdate();
          ps.setInt(1, 2); ps.setString(2, "two"); ps.executeUpdate();
          c.commit();
          ps.setInt(1, 3); ps.setString(2, "three"); ps.executeUpdate();
          ps.setInt(1, 4); ps.setString(2, "four"); ps.executeUpdate();
          Map<String, Object> m = new LinkedHashMap<>();
          m.put("inside_before_rollback", query(c, "SELECT count(*)::int FROM " + t).get(0).get(0));
          c.rollback();
          c.setAutoCommit(true);
          m.put("rows", query(c, "SELECT id, v FROM " + t + " ORDER BY id"));
          return m;
        }
      }
    });

    // (d) COPY FROM STDIN and COPY TO STDOUT (text format) through the CopyManager
    step(out, "copy", () -> {
      try (Connection c = open()) {
        String t = PREFIX + "_copy";
        try (Statement s = c.createStatement()) { s.execute("CREATE TABLE " + t + " (id int PRIMARY KEY, name text, note text, amount numeric)"); }
        CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
        String data = Files.readString(Path.of(env("XM_COPY_IN")), StandardCharsets.UTF_8);
        long in = cm.copyIn("COPY " + t + " FROM STDIN", new StringReader(data));
        StringWriter w = new StringWriter();
        long outRows = cm.copyOut("COPY (SELECT * FROM " + t + " ORDER BY id) TO STDOUT", w);
        Files.writeString(Path.of(env("XM_COPY_OUT")), w.toString(), StandardCharsets.UTF_8);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("in", in);
        m.put("out", outRows);
        return m;
      }
    });

    // (e) LISTEN on one connection, NOTIFY from another
    step(out, "notify", () -> {
      try (Connection listener = open(); Connection notifier = open()) {
        String ch = PREFIX + "_chan";
        try (Statement s = listener.createStatement()) { s.execute("LISTEN " + ch); }
        String payload = "jdbc payload ✓ " + System.nanoTime();
        int notifierPid;
        try (PreparedStatement ps = notifier.prepareStatement("SELECT pg_backend_pid(), pg_notify(?, ?)")) {
          ps.setString(1, ch);
          ps.setString(2, payload);
          try (ResultSet rs = ps.executeQuery()) { rs.next(); notifierPid = rs.getInt(1); }
        }
        PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(10_000);
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("sent", payload);
        List<Map<String, Object>> list = new ArrayList<>();
        if (got != null) for (PGNotification n : got) {
          Map<String, Object> e = new LinkedHashMap<>();
          e.put("channel", n.getName());
          e.put("payload", n.getParameter());
          e.put("from_notifier", n.getPID() == notifierPid);
          list.add(e);
        }
        m.put("received", list);
        return m;
      }
    });

    // (f) cancel a running pg_sleep(30): Statement.cancel() sends a CancelRequest to the proxy
    step(out, "cancel", () -> {
      try (Connection c = open(); Connection watcher = open()) {
        int pid = (Integer) query(c, "SELECT pg_backend_pid()").get(0).get(0);
        Statement s = c.createStatement();
        long[] failedAt = new long[1];
        CompletableFuture<Map<String, Object>> running = CompletableFuture.supplyAsync(() -> {
          Map<String, Object> m = new LinkedHashMap<>();
          try {
            s.execute("SELECT pg_sleep(30)");
            m.put("completed", true);
          } catch (SQLException e) {
            failedAt[0] = System.nanoTime();
            m.put("sqlstate", e.getSQLState());
            m.put("message", e.getMessage());
          }
          return m;
        });
        boolean active = false;
        long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(10);
        try (PreparedStatement ps = watcher.prepareStatement("SELECT count(*)::int FROM pg_stat_activity WHERE pid = ? AND state = 'active' AND query = 'SELECT pg_sleep(30)'")) {
          ps.setInt(1, pid);
          while (!active && System.nanoTime() < until) {
            try (ResultSet rs = ps.executeQuery()) { rs.next(); active = rs.getInt(1) == 1; }
            if (!active) Thread.sleep(20);
          }
        }
        long sentAt = System.nanoTime();
        s.cancel();
        Map<String, Object> m = running.get(35, TimeUnit.SECONDS);
        m.put("was_active", active);
        if (failedAt[0] != 0) m.put("ms", (failedAt[0] - sentAt) / 1e6);
        // The session survives a cancel.
        m.put("after", query(c, "SELECT 'still here'").get(0).get(0));
        s.close();
        return m;
      }
    });

    out.put("timings_ms", TIMINGS);
    System.out.println(toJson(out));
  }

  static String toJson(Object o) {
    if (o == null) return "null";
    if (o instanceof Boolean || o instanceof Integer || o instanceof Long) return o.toString();
    if (o instanceof Number) {
      double d = ((Number) o).doubleValue();
      return Double.isFinite(d) ? Double.toString(d) : "null";
    }
    if (o instanceof Map) {
      StringBuilder b = new StringBuilder("{");
      for (Map.Entry<?, ?> e : ((Map<?, ?>) o).entrySet()) {
        if (b.length() > 1) b.append(',');
        b.append(toJson(String.valueOf(e.getKey()))).append(':').append(toJson(e.getValue()));
      }
      return b.append('}').toString();
    }
    if (o instanceof List) {
      StringBuilder b = new StringBuilder("[");
      for (Object e : (List<?>) o) {
        if (b.length() > 1) b.append(',');
        b.append(toJson(e));
      }
      return b.append(']').toString();
    }
    String s = o.toString();
    StringBuilder b = new StringBuilder("\"");
    for (int i = 0; i < s.length(); i++) {
      char ch = s.charAt(i);
      switch (ch) {
        case '"': b.append("\\\""); break;
        case '\\': b.append("\\\\"); break;
        case '\n': b.append("\\n"); break;
        case '\r': b.append("\\r"); break;
        case '\t': b.append("\\t"); break;
        default:
          if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
          else b.append(ch);
      }
    }
    return b.append('"').toString();
  }
}
