//! Real Redis and PostgreSQL servers for the lookup tests, one process per test on a free
//! loopback port, from the Debian packages `make test` installs (`redis-server`,
//! `postgresql`). Each can be restarted mid-test; its data survives (Redis with an
//! always-fsynced append-only file, PostgreSQL in its data directory).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: &mut Child, signal: i32) {
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Child,
    /// A server that takes TLS only: its certificate, key and authority.
    tls: Option<[PathBuf; 3]>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_port();
        let child = Self::spawn(port, dir.path(), None);
        RedisServer {
            port,
            dir,
            child,
            tls: None,
        }
    }

    /// A server that takes TLS connections only (`rediss://`), with this certificate and
    /// key, signed by `ca`.
    pub fn start_tls_only(cert: &Path, key: &Path, ca: &Path) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_port();
        let tls = [cert.to_path_buf(), key.to_path_buf(), ca.to_path_buf()];
        let child = Self::spawn(port, dir.path(), Some(&tls));
        RedisServer {
            port,
            dir,
            child,
            tls: Some(tls),
        }
    }

    fn spawn(port: u16, dir: &Path, tls: Option<&[PathBuf; 3]>) -> Child {
        let mut server = Command::new("redis-server");
        match tls {
            None => server.args(["--port", &port.to_string()]),
            Some([cert, key, ca]) => server
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = server
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; `make test` installs it)");
        wait_for_port(port, "redis-server");
        child
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    pub fn connection(&self) -> redis::Connection {
        let client = match &self.tls {
            None => redis::Client::open(self.url()),
            Some([_, _, ca]) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
        };
        client.unwrap().get_connection().unwrap()
    }

    /// Kills the server, keeps it down for `down`, and starts it again on the same port.
    pub fn restart(&mut self, down: Duration) {
        stop(&mut self.child, libc::SIGKILL);
        std::thread::sleep(down);
        self.child = Self::spawn(self.port, self.dir.path(), self.tls.as_ref());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        stop(&mut self.child, libc::SIGKILL);
    }
}

pub struct PostgresServer {
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
    /// Who the server runs as: PostgreSQL refuses to run as root.
    owner: Option<(u32, u32)>,
    child: Child,
}

/// The newest installed PostgreSQL's programs (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL (Debian package postgresql; `make test` installs it)")
        .map(|e| e.unwrap().path().join("bin"))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    versions
        .pop()
        .expect("a PostgreSQL server under /usr/lib/postgresql")
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a `postgres` user")
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        Self::start_with(|_, _| {})
    }

    /// A server that takes TLS connections only (`hostssl`), with this certificate and key.
    pub fn start_tls_only(cert: &Path, key: &Path) -> PostgresServer {
        Self::start_with(|data, owner| {
            use std::os::unix::fs::PermissionsExt;
            // The server reads them as its own user, which cannot see the test's directory.
            for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
                let to = data.join(name);
                std::fs::copy(from, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
                }
            }
            let conf = data.join("postgresql.conf");
            let mut text = std::fs::read_to_string(&conf).unwrap();
            text.push_str(
                "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            );
            std::fs::write(&conf, text).unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
            )
            .unwrap();
        })
    }

    /// A server where users other than the tests' own (`sluice`) log in with a password
    /// (SCRAM), as on a managed PostgreSQL.
    pub fn start_with_passwords() -> PostgresServer {
        Self::start_with(|data, _| {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all sluice 127.0.0.1/32 trust\n\
                 host all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
        })
    }

    /// Makes the cluster, lets `setup` change its data directory, and starts the server.
    fn start_with(setup: impl FnOnce(&Path, Option<(u32, u32)>)) -> PostgresServer {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = postgres_bin();
        let owner = (unsafe { libc::geteuid() } == 0).then(|| (id_of("-u"), id_of("-g")));
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D", dir.path().join("data").to_str().unwrap()])
            .args(["-U", "sluice", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb.output().unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        setup(&dir.path().join("data"), owner);
        let port = crate::free_port();
        let child = Self::spawn(&bin, dir.path(), port, owner);
        PostgresServer {
            port,
            dir,
            bin,
            owner,
            child,
        }
    }

    fn spawn(bin: &Path, dir: &Path, port: u16, owner: Option<(u32, u32)>) -> Child {
        use std::os::unix::process::CommandExt;
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .args(["-D", dir.join("data").to_str().unwrap()])
            .args(["-p", &port.to_string(), "-k", dir.to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = owner {
            postgres.uid(uid).gid(gid);
        }
        let child = postgres.spawn().expect("start postgres");
        wait_for_port(port, "postgres");
        // Listening comes before accepting connections: wait until a query works.
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = Self::url_for(port);
        loop {
            let ok = Command::new(bin.join("psql"))
                .args([url.as_str(), "-qAt", "-c", "select 1"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    fn url_for(port: u16) -> String {
        format!("postgres://sluice@127.0.0.1:{port}/postgres")
    }

    pub fn url(&self) -> String {
        Self::url_for(self.port)
    }

    /// Runs SQL with psql; panics with its error.
    pub fn sql(&self, sql: &str) {
        let out = Command::new(self.bin.join("psql"))
            .args([
                self.url().as_str(),
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (fast shutdown), keeps it down for `down`, starts it again.
    pub fn restart(&mut self, down: Duration) {
        stop(&mut self.child, libc::SIGINT);
        std::thread::sleep(down);
        self.child = Self::spawn(&self.bin, self.dir.path(), self.port, self.owner);
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        stop(&mut self.child, libc::SIGQUIT);
    }
}
