//! Certificates made per test run with `openssl`: an authority, a server certificate it
//! signed for `localhost` and 127.0.0.1, one it signed for another host, and an authority
//! that signed nothing of the server's.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Certs {
    pub ca: PathBuf,
    pub other_ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by `ca`, but for `elsewhere.test` only.
    pub wrong_host_cert: PathBuf,
    pub wrong_host_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Certs {
    pub fn make(dir: &Path) -> Certs {
        let rsa = ["-newkey", "rsa:2048", "-nodes", "-days", "2"];
        for (name, cn) in [("ca", "sluice-test-ca"), ("other", "someone-else")] {
            let subject = format!("/CN={cn}");
            let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
            let mut args = vec!["req", "-x509"];
            args.extend(rsa);
            args.extend(["-keyout", &key, "-out", &pem, "-subj", &subject]);
            openssl(dir, &args);
        }
        for (name, san) in [
            ("server", "DNS:localhost,IP:127.0.0.1"),
            ("wrong", "DNS:elsewhere.test"),
        ] {
            let (key, csr, pem, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            let mut args = vec!["req"];
            args.extend(&rsa[..3]);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=sluice-test-server",
            ]);
            openssl(dir, &args);
            std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
        }
        Certs {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            wrong_host_cert: dir.join("wrong.pem"),
            wrong_host_key: dir.join("wrong.key"),
        }
    }
}
