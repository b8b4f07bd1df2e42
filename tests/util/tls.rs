//! Certificates for a TLS broker, made by the openssl command line.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority: its certificate and key (PEM files).
pub struct Ca {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new CA named `name`, its files in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> Ca {
    let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    Ca {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A server certificate for `host` (an IP address) signed by `ca`; the
/// lines of a Mosquitto listener that serves it. The files are readable by
/// all: Mosquitto started as root reads them as its own user.
pub fn server_cert(dir: &Path, ca: &Ca, host: &str) -> String {
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName = IP:{host}\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n"),
    )
    .expect("write server.ext");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={host}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            ca.cert.to_str().unwrap(),
            "-CAkey",
            ca.key.to_str().unwrap(),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "30",
            "-extfile",
            "server.ext",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("read the certificates' dir") {
        let path = entry.expect("dir entry").path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        ca.cert.display(),
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    )
}
